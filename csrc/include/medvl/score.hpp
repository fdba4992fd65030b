#pragma once
#include <pybind11/pybind11.h>

namespace medvl {
void register_score(pybind11::module_& m);
}
