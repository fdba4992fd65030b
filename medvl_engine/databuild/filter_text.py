"""`build-data filter-text`: keep rows whose caption and inline mentions hold enough medical terms.

PubMedVision (appendix B.1) counts the terms of a medical lexicon in each caption and drops rows with
fewer than five. Matching here is one pass of an Aho-Corasick automaton (pyahocorasick, in C) over the
normalised text, whatever the lexicon's size:

- text and terms are normalised alike: lower case, every run of characters that are not letters or
  digits becomes one space (so "X-ray", "x ray" and "x-ray" are one term, and "H&E" is "h e");
- a match counts only on word boundaries (the characters around it are spaces or the text's ends):
  "ct" is found in "axial CT scan", not in "effect";
- overlapping matches resolve leftmost-longest, without overlap: "small cell lung cancer" is one term,
  not four ("lung", "cancer", "lung cancer", ...).

`count="occurrences"` counts every match (the paper's "number of medical terms"); `"distinct"` counts
different terms. The summary holds the histogram of term counts over every row seen.
"""

from __future__ import annotations

import re
from pathlib import Path

from medvl_engine.databuild.config import TextFilterConfig
from medvl_engine.databuild.stage import Decision, Stage
from medvl_engine.errors import ConfigError

DEFAULT_LEXICON = Path(__file__).with_name("lexicon.txt")
_NON_WORD = re.compile(r"[\W_]+")
HISTOGRAM_CAP = 30  # term counts at or above this share the last bucket


def normalise(text: str) -> str:
    """Lower case, runs of non-alphanumerics as one space, and one space at each end (word boundaries)."""
    return f" {_NON_WORD.sub(' ', text.lower()).strip()} "


def read_lexicon(path: str | Path | None = None) -> list[str]:
    """The terms of a lexicon file: one per line; `#` starts a comment line; text after a tab is ignored
    (so a tab-separated file derived from the UMLS SPECIALIST lexicon works as it is)."""
    path = Path(path) if path else DEFAULT_LEXICON
    if not path.is_file():
        raise FileNotFoundError(f"text.lexicon {path}: file not found")
    terms = []
    for line in path.read_text(encoding="utf-8").splitlines():
        term = line.split("\t", 1)[0].strip()
        if term and not term.startswith("#"):
            terms.append(term)
    if not terms:
        raise ConfigError(f"text.lexicon {path}: no terms")
    return terms


class TermCounter:
    """Counts lexicon terms in texts (see the module docstring for the matching rules)."""

    def __init__(self, terms: list[str]):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        self.terms: list[str] = []
        for term in terms:
            key = normalise(term).strip()
            if key and key not in self.automaton:
                # Keys carry their leading space: a match always starts at a word start.
                self.automaton.add_word(f" {key}", (len(self.terms), len(key)))
                self.terms.append(key)
        if not self.terms:
            raise ValueError("TermCounter: no terms")
        self.automaton.make_automaton()

    def matches(self, text: str) -> list[int]:
        """Term ids found in `text`, leftmost-longest without overlap, in text order."""
        norm = normalise(text)
        # (start, -length, term): the automaton reports every match by its end; the one that ends
        # on a word boundary is a candidate.
        found = sorted((end - length, -length, term) for end, (term, length) in self.automaton.iter(norm)
                       if norm[end + 1] == " ")
        out, free = [], 0
        for start, negative_length, term in found:
            if start >= free:
                out.append(term)
                free = start - negative_length  # the next term may begin on the space after this one
        return out

    def count(self, text: str, *, distinct: bool = False) -> int:
        found = self.matches(text)
        return len(set(found)) if distinct else len(found)


class TextFilter(Stage):
    name = "filter-text"
    batch_size = 1024

    def __init__(self, cfg: TextFilterConfig):
        self.cfg = cfg
        self.lexicon_path = Path(cfg.lexicon) if cfg.lexicon else DEFAULT_LEXICON
        self.counter = TermCounter(read_lexicon(self.lexicon_path))
        self.histogram: list[int] = [0] * (HISTOGRAM_CAP + 1)

    def identity(self) -> dict:
        import hashlib

        return {"lexicon": str(self.lexicon_path.absolute()), "min_terms": self.cfg.min_terms,
                "count": self.cfg.count, "lexicon_sha1": hashlib.sha1(self.lexicon_path.read_bytes()).hexdigest()}

    def restore(self, run, extra: dict, counters: dict) -> None:
        counters.setdefault("histogram", [0] * (HISTOGRAM_CAP + 1))
        self.histogram = counters["histogram"]

    def decide(self, records):
        distinct = self.cfg.count == "distinct"
        out = []
        for record in records:
            n = self.counter.count(record.text(), distinct=distinct)
            self.histogram[min(n, HISTOGRAM_CAP)] += 1
            if n >= self.cfg.min_terms:
                out.append(Decision(True))
            else:
                out.append(Decision(False, "too few medical terms", f"{n} < {self.cfg.min_terms}"))
        return out

    def summary(self, counters: dict) -> tuple[dict, str]:
        hist = counters["histogram"]
        total = sum(hist)
        top = max(max(hist), 1)
        lines = ["", f"### medical terms per row ({self.cfg.count}; keep >= {self.cfg.min_terms}; "
                     f"lexicon of {len(self.counter.terms)} terms)", "",
                 "| terms | rows | share % | |", "|---:|---:|---:|:---|"]
        for k, n in enumerate(hist):
            if n:
                label = f">= {k}" if k == HISTOGRAM_CAP else str(k)
                lines.append(f"| {label} | {n} | {100 * n / total:.1f} | {'#' * round(30 * n / top)} |")
        return {"term_histogram": {str(k): n for k, n in enumerate(hist) if n},
                "lexicon_terms": len(self.counter.terms)}, "\n".join(lines) + "\n"
