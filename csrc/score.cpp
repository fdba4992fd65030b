// The batched entry point `_native.score`. With the GIL held it checks the whole batch and converts the
// comparison targets; then it works through steps of ~512 KiB of text per thread: it copies a step's
// responses into a reused buffer (GIL held), grades them on a WorkerPool (GIL released, no Python
// object touched) and builds that step's numpy and list outputs (GIL held). With several threads the
// copy of the next step and the outputs of the previous one overlap the grading of the current one.
// Nothing is sized by the whole batch but the outputs, one record per row and the comparison targets:
// fresh memory costs page faults on every call (a 165 MB arena per call once spent ~25% of the time
// there; per-step results and an exactly sized lowercase arena cut the faults per call by 30%).
#include "medvl/score.hpp"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "medvl/grader.hpp"
#include "medvl/unicode_tables.hpp"
#include "medvl/worker_pool.hpp"

namespace py = pybind11;

namespace medvl {
namespace {

// Below this many code points per thread, starting a thread (~50 us) costs more than the scan it saves
// (the grader reads ~1 code point per ns), so small batches run on fewer threads or inline.
constexpr std::size_t kMinWorkPerThread = std::size_t{1} << 17;
// Text per step and thread (bytes): a step stays in the 1 MiB L2 cache from its copy to its scan
// (4 MiB steps, which live in L3, were ~5% slower on one thread); one hand-off per step (~500 for the
// 240 MB the benchmark's 100k answers take in storage width) is small next to grading a step (~0.2 ms).
constexpr std::size_t kStepBytes = std::size_t{512} << 10;
constexpr std::size_t kPrefetchRows = 16;
// copy_step asks for the text kCopyAhead rows ahead, at most kCopyAheadBytes of it (longer strings
// stream on their own once started).
constexpr std::size_t kCopyAhead = 2;
constexpr std::size_t kCopyAheadBytes = 8192;

Mode parse_mode(const std::string& name) {
  if (name == "reward") return Mode::reward;
  if (name == "eval") return Mode::eval;
  if (name == "regrade") return Mode::regrade;
  throw py::value_error("unknown mode '" + name + "': expected one of reward, eval, regrade");
}

std::string type_name(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

std::string at(const char* name, std::size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// Strong references to the items of one column, taken up front: later Python calls (a mapping's
// items()) or other threads (while the GIL is released) may change the sequence, never what we read.
// Each item is a cache miss (~100 ns from DRAM), so both passes ask for the item 16 rows ahead.
class Column {
 public:
  Column(py::handle values, const char* name) {
    if (PyUnicode_Check(values.ptr()) || PyBytes_Check(values.ptr())) {
      throw py::type_error(std::string(name) + " must be a sequence, not a single " + type_name(values.ptr()));
    }
    PyObject* fast = PySequence_Fast(values.ptr(), "");
    if (fast == nullptr) {
      PyErr_Clear();
      throw py::type_error(std::string(name) + " must be a sequence, got " + type_name(values.ptr()));
    }
    const std::size_t n = static_cast<std::size_t>(PySequence_Fast_GET_SIZE(fast));
    PyObject** source = PySequence_Fast_ITEMS(fast);
    items_.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      if (i + kPrefetchRows < n) __builtin_prefetch(source[i + kPrefetchRows], 1);
      items_[i] = source[i];
      Py_INCREF(items_[i]);
    }
    Py_DECREF(fast);
  }

  ~Column() {
    for (std::size_t i = 0; i < items_.size(); ++i) {
      if (i + kPrefetchRows < items_.size()) __builtin_prefetch(items_[i + kPrefetchRows], 1);
      Py_DECREF(items_[i]);
    }
  }

  Column(const Column&) = delete;
  Column& operator=(const Column&) = delete;

  std::size_t size() const { return items_.size(); }
  PyObject* operator[](std::size_t i) const { return items_[i]; }

 private:
  std::vector<PyObject*> items_;
};

PyObject* checked_str(PyObject* obj, const std::string& where) {
  if (!PyUnicode_Check(obj)) throw py::type_error(where + " must be str, got " + type_name(obj));
  return obj;
}

// The same check for item i of a column; the message is only built on failure (this runs per row).
PyObject* checked_item(PyObject* obj, const char* name, std::size_t i) {
  if (!PyUnicode_Check(obj)) throw py::type_error(at(name, i) + " must be str, got " + type_name(obj));
  return obj;
}

// The code points of a str (lone surrogates included, as they are stored).
std::u32string code_points(PyObject* str) {
  const Py_ssize_t n = PyUnicode_GET_LENGTH(str);
  const int kind = PyUnicode_KIND(str);
  const void* data = PyUnicode_DATA(str);
  std::u32string out(static_cast<std::size_t>(n), U'\0');
  for (Py_ssize_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = PyUnicode_READ(kind, data, i);
  return out;
}

py::str to_str(const std::u32string& s) {
  PyObject* out = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, s.data(), static_cast<Py_ssize_t>(s.size()));
  if (out == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(out);
}

// Threads worth using for `total` code points over n rows: `requested` (0: every core), but never so
// many that a thread gets less than kMinWorkPerThread.
unsigned thread_count(unsigned requested, std::size_t n, std::size_t total) {
  const unsigned threads = requested == 0 ? std::max(1u, std::thread::hardware_concurrency()) : requested;
  const std::size_t useful = std::max<std::size_t>(1, total / kMinWorkPerThread);
  return static_cast<unsigned>(std::min<std::size_t>({threads, useful, std::max<std::size_t>(1, n)}));
}

// One row: its response (source buffer in the str, place in the step buffer) and its choices.
struct RowRef {
  const void* source = nullptr;
  int kind = 1;
  std::size_t size = 0;
  std::size_t offset = 0;  // bytes into the step buffer
  std::size_t key = 0;
  std::size_t options_begin = 0;
  std::size_t options_count = 0;
  bool has_options = false;
};

// A run of rows [begin, end) with their text copied into one buffer, and their results.
struct Step {
  std::size_t begin = 0;
  std::size_t end = 0;
  std::vector<std::uint8_t> buffer;
  std::vector<RowResult> results;
};

// The checked batch: frozen columns, per-row references, comparison targets, and (strong references
// to) the letter objects handed back as results.
class Batch {
 public:
  Batch(py::handle responses, py::handle answers, py::handle labels, py::handle options)
      : responses_(responses, "responses") {
    const Column ans(answers, "answers");
    const Column lab(labels, "answer_labels");
    const bool with_options = !options.is_none();
    const Column opts(with_options ? options : py::handle(py::tuple()), "options");
    const std::size_t n = responses_.size();
    check_length(ans.size(), "answers", n);
    check_length(lab.size(), "answer_labels", n);
    if (with_options) check_length(opts.size(), "options", n);

    rows_.resize(n);
    PyObject* previous_answer = nullptr;
    PyObject* previous_label = nullptr;
    PyObject* previous_options = nullptr;
    for (std::size_t i = 0; i < n; ++i) {
      // Each str header is a cache miss (~100 ns from DRAM); asking for it 16 rows ahead hides that.
      if (i + kPrefetchRows < n) __builtin_prefetch(responses_[i + kPrefetchRows]);
      PyObject* response = checked_item(responses_[i], "responses", i);
      PyObject* answer = checked_item(ans[i], "answers", i);
      PyObject* label = checked_item(lab[i], "answer_labels", i);
      RowRef& row = rows_[i];
      row.source = PyUnicode_DATA(response);
      row.kind = PyUnicode_KIND(response);
      row.size = static_cast<std::size_t>(PyUnicode_GET_LENGTH(response));
      total_ += row.size;
      // The n answers of one prompt share their Sample: convert its strings once per group.
      if (i > 0 && answer == previous_answer && label == previous_label) {
        row.key = rows_[i - 1].key;
      } else {
        row.key = add_choice(label, answer);
      }
      PyObject* row_options = with_options ? opts[i] : Py_None;
      if (row_options != Py_None) {
        row.has_options = true;
        if (i > 0 && row_options == previous_options && label == previous_label && rows_[i - 1].has_options) {
          row.options_begin = rows_[i - 1].options_begin;
          row.options_count = rows_[i - 1].options_count;
        } else {
          add_options(row, row_options, label, i);
        }
      }
      previous_answer = answer;
      previous_label = label;
      previous_options = row_options;
    }
  }

  std::size_t size() const { return rows_.size(); }
  std::size_t code_points_total() const { return total_; }
  void prepare_choices(WorkerPool& pool) {
    choices_.allocate_lowered();
    pool.run(choices_.size(), [this](std::size_t k) { choices_.prepare(k); });
  }
  RowRef& row(std::size_t i) { return rows_[i]; }
  const RowRef& row(std::size_t i) const { return rows_[i]; }
  void prefetch(std::size_t i) const {
    if (i < rows_.size()) __builtin_prefetch(responses_[i]);
  }

  RowInput input(std::size_t i, const std::uint8_t* step_buffer) const {
    const RowRef& row = rows_[i];
    RowInput in;
    in.response.kind = row.kind;
    in.response.size = row.size;
    in.response.data = step_buffer + row.offset;
    in.choices = &choices_;
    in.key = row.key;
    in.has_options = row.has_options;
    in.options_begin = row.options_begin;
    in.option_count = row.options_count;
    return in;
  }

  // The parsed prediction as a str (GIL held): a slice of the original response (the whole str
  // itself, not a copy, when nothing was stripped), or its own text after tag removal.
  py::object parsed(std::size_t i, const Prediction& prediction) const {
    PyObject* out = nullptr;
    if (prediction.owned) {
      out = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, prediction.text.data(),
                                      static_cast<Py_ssize_t>(prediction.text.size()));
    } else {
      out = PyUnicode_Substring(responses_[i], static_cast<Py_ssize_t>(prediction.span.begin),
                                static_cast<Py_ssize_t>(prediction.span.end));
    }
    if (out == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(out);
  }

  py::object letter(std::size_t i, std::int32_t letter, const py::object& none) const {
    const RowRef& row = rows_[i];
    if (letter == kLabelLetter) return letters_[row.key];
    if (letter >= 0) return letters_[row.options_begin + static_cast<std::size_t>(letter)];
    return none;
  }

 private:
  static void check_length(std::size_t got, const char* name, std::size_t n) {
    if (got != n) {
      throw py::value_error(std::string(name) + " has " + std::to_string(got) + " items but responses has " +
                            std::to_string(n));
    }
  }

  static Text text_of(PyObject* str) {
    return Text{PyUnicode_DATA(str), static_cast<std::size_t>(PyUnicode_GET_LENGTH(str)), PyUnicode_KIND(str)};
  }

  std::size_t add_choice(PyObject* label, PyObject* text) {
    letters_.push_back(py::reinterpret_borrow<py::object>(label));
    return choices_.add(text_of(label), text_of(text));
  }

  // options[i].items() in order: each (letter, text) a Choice; the row's label must be a letter.
  void add_options(RowRef& row, PyObject* mapping, PyObject* label, std::size_t i) {
    static PyObject* mapping_abc = py::object(py::module_::import("collections.abc").attr("Mapping")).release().ptr();
    const int is_mapping = PyDict_Check(mapping) ? 1 : PyObject_IsInstance(mapping, mapping_abc);
    if (is_mapping < 0) throw py::error_already_set();
    if (is_mapping == 0) {
      throw py::type_error(at("options", i) + " must be a mapping of letter -> text or None, got " +
                           type_name(mapping));
    }
    row.options_begin = choices_.size();
    bool label_found = false;
    auto add = [&](PyObject* key, PyObject* text) {
      if (!PyUnicode_Check(key)) checked_str(key, at("options", i) + " key");
      if (!PyUnicode_Check(text)) checked_str(text, at("options", i) + "[" + std::string(py::repr(key)) + "]");
      // str == str on code points, as `label in options` compares the keys.
      label_found = label_found || PyUnicode_Compare(key, label) == 0;
      add_choice(key, text);
    };
    if (PyDict_CheckExact(mapping)) {
      // A plain dict is read in place (no Python code runs); anything else through its own items().
      PyObject *key = nullptr, *text = nullptr;
      Py_ssize_t pos = 0;
      while (PyDict_Next(mapping, &pos, &key, &text)) add(key, text);
    } else {
      for (py::handle item : py::reinterpret_borrow<py::object>(mapping).attr("items")()) {
        const py::tuple pair = py::reinterpret_borrow<py::object>(item).cast<py::tuple>();
        if (pair.size() != 2) throw py::type_error(at("options", i) + ".items() must yield (letter, text) pairs");
        add(pair[0].ptr(), pair[1].ptr());
      }
    }
    row.options_count = choices_.size() - row.options_begin;
    if (!label_found) {
      py::list letters;
      for (std::size_t k = row.options_begin; k < choices_.size(); ++k) letters.append(letters_[k]);
      const py::str message = py::str("row {}: answer_label {!r} is not among its options ({})")
                                  .format(i, py::handle(label), py::str(", ").attr("join")(letters));
      PyErr_SetObject(PyExc_ValueError, message.ptr());
      throw py::error_already_set();
    }
  }

  Column responses_;
  std::vector<RowRef> rows_;
  ChoiceSet choices_;
  std::vector<py::object> letters_;  // per choice: the letter returned when it is the hit
  std::size_t total_ = 0;
};

// The five results of a call, filled one step at a time with the GIL held.
class Outputs {
 public:
  explicit Outputs(std::size_t n)
      : reward_(static_cast<py::ssize_t>(n)),
        correct_(static_cast<py::ssize_t>(n)),
        format_ok_(static_cast<py::ssize_t>(n)),
        parsed_(n),
        letters_(n),
        none_(py::str("")) {}

  void emit(const Batch& batch, const Step& step) {
    float* reward = reward_.mutable_data();
    bool* correct = correct_.mutable_data();
    bool* format_ok = format_ok_.mutable_data();
    for (std::size_t i = step.begin; i < step.end; ++i) {
      batch.prefetch(i + kPrefetchRows);
      const RowResult& r = step.results[i - step.begin];
      reward[i] = r.reward;
      correct[i] = r.correct;
      format_ok[i] = r.format_ok;
      PyList_SET_ITEM(parsed_.ptr(), static_cast<Py_ssize_t>(i), batch.parsed(i, r.parsed).release().ptr());
      PyList_SET_ITEM(letters_.ptr(), static_cast<Py_ssize_t>(i), batch.letter(i, r.letter, none_).release().ptr());
    }
  }

  py::tuple release() { return py::make_tuple(reward_, correct_, format_ok_, parsed_, letters_); }

 private:
  py::array_t<float> reward_;
  py::array_t<bool> correct_;
  py::array_t<bool> format_ok_;
  py::list parsed_;
  py::list letters_;
  py::object none_;
};

// Takes the next run of rows with about `bytes` of text into step and places them in its buffer;
// false when no row is left.
bool plan_step(Batch& batch, std::size_t begin, std::size_t bytes, Step& step) {
  const std::size_t n = batch.size();
  if (begin >= n) return false;
  step.begin = begin;
  step.end = begin;
  std::size_t used = 0;
  while (step.end < n && (step.end == begin || used < bytes)) {
    RowRef& row = batch.row(step.end++);
    used = (used + 3) & ~std::size_t{3};  // 2- and 4-byte code units stay aligned
    row.offset = used;
    used += row.size * static_cast<std::size_t>(row.kind);
  }
  if (step.buffer.size() < used) step.buffer.resize(used);
  if (step.results.size() < step.end - begin) step.results.resize(step.end - begin);
  return true;
}

// Copies the step's responses into its buffer, with the GIL held: no Python code runs meanwhile and
// the Column references keep each str (and so its buffer) alive. The strings lie scattered over the
// heap, so a plain copy waits on memory for each one; asking for the text of the row kCopyAhead rows
// ahead keeps the next strings in flight while this one is copied (~3% on one thread).
void copy_step(const Batch& batch, Step& step) {
  for (std::size_t i = step.begin; i < step.end; ++i) {
    if (i + kCopyAhead < batch.size()) {
      const RowRef& ahead = batch.row(i + kCopyAhead);
      const char* text = static_cast<const char*>(ahead.source);
      const std::size_t bytes = std::min(ahead.size * static_cast<std::size_t>(ahead.kind), kCopyAheadBytes);
      for (std::size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(text + offset);
    }
    const RowRef& row = batch.row(i);
    std::memcpy(step.buffer.data() + row.offset, row.source, row.size * static_cast<std::size_t>(row.kind));
  }
}

// Grades every row, one step (a run of rows with ~kStepBytes of text per thread) at a time, in two
// alternating Steps. With workers, the calling thread (GIL held) builds the previous step's outputs
// and copies the next step while the workers grade this one, then releases the GIL and joins them:
// the GIL-bound work no longer adds to the scan. On one thread the same loop runs its parts in turn,
// copying each step just before it is graded so that it is still in the L2 cache.
void grade(Batch& batch, Mode mode, WorkerPool& pool, Outputs& outputs) {
  {
    py::gil_scoped_release release;
    batch.prepare_choices(pool);
  }
  const bool overlap = pool.size() > 1;
  const std::size_t step_bytes = kStepBytes * pool.size();
  Step steps[2];
  Step* graded = nullptr;  // graded, outputs not built yet
  Step* current = &steps[0];
  if (!plan_step(batch, 0, step_bytes, *current)) return;
  copy_step(batch, *current);
  while (current != nullptr) {
    Step& step = *current;
    const std::function<void(std::size_t)> job = [&](std::size_t k) {
      step.results[k] = score_row(mode, batch.input(step.begin + k, step.buffer.data()));
    };
    pool.start(step.end - step.begin, job);
    Step* next = &steps[current == &steps[0] ? 1 : 0];
    try {
      if (graded != nullptr) outputs.emit(batch, *graded);
      if (!plan_step(batch, step.end, step_bytes, *next)) next = nullptr;
      if (next != nullptr && overlap) copy_step(batch, *next);
    } catch (...) {
      // The workers still read this step and job: let them finish before the stack unwinds.
      py::gil_scoped_release release;
      try {
        pool.wait();
      } catch (...) {
      }
      throw;
    }
    {
      py::gil_scoped_release release;
      pool.wait();
    }
    if (next != nullptr && !overlap) copy_step(batch, *next);
    graded = current;
    current = next;
  }
  if (graded != nullptr) outputs.emit(batch, *graded);
}

py::tuple score(py::handle responses, py::handle answers, py::handle labels, py::handle options,
                const std::string& mode_name, int threads) {
  const Mode mode = parse_mode(mode_name);
  if (threads < 0) throw py::value_error("threads must be >= 0 (0: every core)");
  Batch batch(responses, answers, labels, options);
  Outputs outputs(batch.size());
  {
    WorkerPool pool(thread_count(static_cast<unsigned>(threads), batch.size(), batch.code_points_total()));
    grade(batch, mode, pool, outputs);
  }
  return outputs.release();
}

py::tuple int_tuple(const char32_t* begin, const char32_t* end) {
  py::list out;
  for (const char32_t* p = begin; p != end; ++p) out.append(static_cast<std::uint32_t>(*p));
  return py::tuple(out);
}

}  // namespace

void register_score(py::module_& m) {
  m.attr("ABI_VERSION") = 1;
  m.attr("UNICODE_VERSION") = tables::kUnicodeVersion;
  m.attr("MAX_LOWER_EXPANSION") = tables::kMaxLowerExpansion;
  m.attr("WHITESPACE") = int_tuple(std::begin(tables::kWhitespace), std::end(tables::kWhitespace));
  py::dict classes;
  for (const tables::IgnoreCaseClass& cls : tables::kIgnoreCase) {
    classes[to_str(std::u32string(1, cls.pattern))] = int_tuple(std::begin(cls.members), std::end(cls.members));
  }
  m.attr("IGNORECASE_CLASSES") = classes;
  m.def("score", &score, py::arg("responses"), py::arg("answers"), py::arg("answer_labels"), py::arg("options"),
        py::arg("mode"), py::arg("threads"),
        "Grade a batch; returns (reward, correct, format_ok, parsed, letter). See medvl_engine.rewards.score.");
  m.def(
      "lower", [](py::handle s) { return to_str(lower_string(code_points(checked_str(s.ptr(), "s")))); },
      py::arg("s"), "str.lower() on the native tables (exposed so tests can hold them to the interpreter).");
  m.def(
      "strip", [](py::handle s) { return to_str(strip_string(code_points(checked_str(s.ptr(), "s")))); },
      py::arg("s"), "str.strip() on the native tables (exposed so tests can hold them to the interpreter).");
}

}  // namespace medvl
