// Shared declarations for the binding files. Each register_*() adds one area
// of the core to the module; module.cpp only calls them.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "finegym/format.hpp"

namespace py = pybind11;

void register_errors(py::module_& m);
void register_reader(py::module_& m);
void register_writer(py::module_& m);
void register_gather(py::module_& m);

// numpy dtype <-> core dtype.
py::dtype to_numpy(finegym::DType t);
finegym::DType from_numpy(const py::dtype& dt, const char* what);
