// Maps core exceptions to Python types with the core's message:
//   FormatError -> finegym_store._core.FormatError (subclass of ValueError)
//   NotFound    -> KeyError
//   IoError     -> OSError(errno, message, path), so FileNotFoundError etc. apply
// std::invalid_argument -> ValueError and std::out_of_range -> IndexError are
// pybind11's own mapping.
#include <cstring>
#include <memory>

#include "bindings.hpp"
#include "finegym/errors.hpp"
#include "finegym/format.hpp"
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
        [](const py::object& data) {
            // The buffer's bytes in memory order: only a C-contiguous buffer has
            // its logical bytes there (a strided view such as a[::2] or a[::-1]
            // does not), so anything else is refused rather than misread.
            Py_buffer view;
            if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_STRIDES | PyBUF_FORMAT) != 0) {
                PyErr_Clear();
                throw py::type_error("hash64 needs a bytes-like object (buffer protocol), got " +
                                     py::str(py::type::of(data)).cast<std::string>());
            }
            std::unique_ptr<Py_buffer, void (*)(Py_buffer*)> release_view(&view, PyBuffer_Release);
            if (!PyBuffer_IsContiguous(&view, 'C'))
                throw py::value_error("hash64 needs a C-contiguous buffer (the bytes in memory order); got a strided "
                                      "view: pass numpy.ascontiguousarray(a) to hash its logical bytes");
            if (view.format != nullptr && std::strchr(view.format, 'O') != nullptr)
                throw py::type_error("hash64 hashes bytes, not Python objects: got a buffer of object pointers");
            const void* ptr = view.buf;
            const auto size = static_cast<std::size_t>(view.len);
            py::gil_scoped_release release;  // reads the caller's buffer only, which the view keeps alive
            return finegym::hash64(ptr, size);
        },
        py::arg("data"), "XXH64 (seed 0) of a C-contiguous buffer: the checksum the format uses.");
    m.attr("MAGIC") = py::bytes(finegym::kMagic.data(), finegym::kMagic.size());
    m.attr("FORMAT_VERSION") = finegym::kFormatVersion;
    m.attr("HEADER_SIZE") = finegym::kHeaderSize;
    m.attr("SECTION_ENTRY_SIZE") = finegym::kSectionEntrySize;
    m.attr("FEATURE_ALIGN") = finegym::kFeatureAlign;
    m.attr("MIN_FORMAT_VERSION") = finegym::kMinFormatVersion;
    m.attr("BLOCK_SIZE") = finegym::kBlockSize;
}
