// Python's str semantics on code points: isspace(), full lower() with Final_Sigma, re IGNORECASE classes.
// Every answer comparison goes through these, so they follow the interpreter the tables were generated
// from (csrc/gen_unicode_tables.py) rather than any particular Unicode release.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>

#include "medvl/unicode_tables.hpp"

namespace medvl {

namespace detail {

constexpr std::array<bool, 256> latin1_space() {
  std::array<bool, 256> table{};
  for (char32_t c : tables::kWhitespace) {
    if (c < 256) table[c] = true;
  }
  return table;
}

inline constexpr std::array<bool, 256> kLatin1Space = latin1_space();

template <std::size_t N>
bool in_ranges(const tables::CodeRange (&ranges)[N], char32_t c) {
  std::size_t lo = 0, hi = N;
  while (lo < hi) {
    std::size_t mid = (lo + hi) / 2;
    if (ranges[mid].last < c) {
      lo = mid + 1;
    } else if (ranges[mid].first > c) {
      hi = mid;
    } else {
      return true;
    }
  }
  return false;
}

}  // namespace detail

inline bool is_space(char32_t c) {
  if (c < 256) return detail::kLatin1Space[c];
  for (char32_t w : tables::kWhitespace) {
    if (w == c) return true;
  }
  return false;
}

inline bool is_cased(char32_t c) { return detail::in_ranges(tables::kCased, c); }
inline bool is_case_ignorable(char32_t c) { return detail::in_ranges(tables::kCaseIgnorable, c); }

// Full lowercase of one code point without context (U+03A3 gives U+03C3; see lower_at for sigma).
// Writes 1 or 2 code points to out and returns how many.
inline int lower_full(char32_t c, char32_t out[2]) {
  if (c < 128) {
    out[0] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    return 1;
  }
  std::size_t lo = 0, hi = sizeof(tables::kLower) / sizeof(tables::kLower[0]);
  while (lo < hi) {
    std::size_t mid = (lo + hi) / 2;
    const tables::LowerEntry& entry = tables::kLower[mid];
    if (entry.code < c) {
      lo = mid + 1;
    } else if (entry.code > c) {
      hi = mid;
    } else {
      out[0] = entry.lower0;
      if (entry.lower1 == 0) return 1;
      out[1] = entry.lower1;
      return 2;
    }
  }
  out[0] = c;
  return 1;
}

// Final_Sigma: capital sigma s[i] becomes final sigma when a cased letter precedes it and none follows
// (case-ignorable code points skipped both ways).
template <class CharT>
char32_t sigma_at(const CharT* s, std::size_t n, std::size_t i) {
  bool final_sigma = false;
  for (std::size_t j = i; j-- > 0;) {
    if (!is_case_ignorable(s[j])) {
      final_sigma = is_cased(s[j]);
      break;
    }
  }
  if (final_sigma) {
    std::size_t k = i + 1;
    while (k < n && is_case_ignorable(s[k])) ++k;
    final_sigma = k == n || !is_cased(s[k]);
  }
  return final_sigma ? 0x3C2 : 0x3C3;
}

// Lowercase of s[i] inside the string s[0, n), as str.lower() does it; 1 or 2 code points to out.
template <class CharT>
inline int lower_at(const CharT* s, std::size_t n, std::size_t i, char32_t out[2]) {
  const char32_t c = s[i];
  if (c < 128) {
    out[0] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    return 1;
  }
  if (c != 0x3A3) return lower_full(c, out);
  out[0] = sigma_at(s, n, i);
  return 1;
}

// Whether code point c matches pattern character p under re.IGNORECASE (p from the regrade patterns).
inline bool ignorecase_match(char32_t p, char32_t c) {
  for (const tables::IgnoreCaseClass& cls : tables::kIgnoreCase) {
    if (cls.pattern == p) {
      return c == cls.members[0] || c == cls.members[1] || c == cls.members[2] || c == cls.members[3];
    }
  }
  return c == p;
}

}  // namespace medvl
