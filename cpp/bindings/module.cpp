// The extension module finegym_store._core: a table of the binding areas.
// The public API lives in Python (finegym_store/); this is glue only.
#include "bindings.hpp"

PYBIND11_MODULE(_core, m) {
    m.doc() = "C++ core of finegym-store (internal; use the finegym_store package)";
    register_errors(m);
    register_reader(m);
    register_writer(m);
    register_gather(m);
}
