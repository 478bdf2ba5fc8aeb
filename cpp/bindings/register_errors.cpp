// Maps core exceptions to Python types with the core's message:
//   FormatError -> finegym_store._core.FormatError (subclass of ValueError)
//   NotFound    -> KeyError
//   IoError     -> OSError(errno, message, path), so FileNotFoundError etc. apply
// std::invalid_argument -> ValueError and std::out_of_range -> IndexError are
// pybind11's own mapping.
#include "bindings.hpp"
#include "finegym/errors.hpp"
#include "finegym/hash.hpp"

void register_errors(py::module_& m) {
    static py::exception<finegym::FormatError> format_error(m, "FormatError", PyExc_ValueError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const finegym::FormatError& e) {
            py::set_error(format_error, e.what());
        } catch (const finegym::NotFound& e) {
            py::set_error(PyExc_KeyError, e.what());
        } catch (const finegym::IoError& e) {
            py::object err = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.error_number(), e.what(), e.path());
            PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
        }
    });

    m.def(
        "hash64",
        [](py::buffer b) {
            py::buffer_info info = b.request();
            const auto size = static_cast<std::size_t>(info.size * info.itemsize);
            py::gil_scoped_release release;  // reads the caller's buffer only, which b keeps alive
            return finegym::hash64(info.ptr, size);
        },
        py::arg("data"), "XXH64 (seed 0) of a contiguous buffer: the checksum the format uses.");
    m.attr("FORMAT_VERSION") = finegym::kFormatVersion;
    m.attr("HEADER_SIZE") = finegym::kHeaderSize;
    m.attr("SECTION_ENTRY_SIZE") = finegym::kSectionEntrySize;
    m.attr("FEATURE_ALIGN") = finegym::kFeatureAlign;
}
