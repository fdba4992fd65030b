// Registers the private extension medvl_engine._native; the work lives in one file per area.
#include <pybind11/pybind11.h>

#include "medvl/score.hpp"

PYBIND11_MODULE(_native, m) {
  m.doc() = "medvl-engine native core: batched answer parsing and reward scoring";
  m.attr("SOURCE_HASH") = MEDVL_SOURCE_HASH;
  medvl::register_score(m);
}
