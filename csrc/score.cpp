#include "medvl/score.hpp"

namespace medvl {
void register_score(pybind11::module_& m) { m.attr("ABI_VERSION") = 1; }
}  // namespace medvl
