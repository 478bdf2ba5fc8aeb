// StoreWriter -> finegym_store._core.Writer. The converter (Python) decides
// what goes in; this glue checks buffers and releases the GIL around I/O.
#include "bindings.hpp"
#include "finegym/schema.hpp"
#include "finegym/writer.hpp"

using finegym::StoreWriter;

namespace {

// A C-contiguous numpy array of a store dtype, or ValueError naming `what`.
py::array require_contiguous(const py::array& a, const char* what) {
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
    return a;
}

}  // namespace

void register_writer(py::module_& m) {
    py::class_<StoreWriter>(m, "Writer", "Atomic store writer (internal; see finegym_store.convert).")
        .def(py::init([](const std::string& path, std::uint64_t n, bool overwrite) {
                 return std::make_unique<StoreWriter>(path, n, overwrite);
             }),
             py::arg("path"), py::arg("num_instances"), py::arg("overwrite") = false)
        .def_property_readonly("bytes_written", &StoreWriter::bytes_written)
        .def(
            "add_array",
            [](StoreWriter& w, const std::string& name, const py::array& a) {
                require_contiguous(a, name.c_str());
                const auto dtype = from_numpy(a.dtype(), name.c_str());
                std::vector<std::uint64_t> shape;
                for (py::ssize_t i = 0; i < a.ndim(); ++i) shape.push_back(static_cast<std::uint64_t>(a.shape(i)));
                if (shape.empty()) shape.push_back(1);
                const auto size = static_cast<std::size_t>(a.nbytes());
                const void* data = a.data();
                py::gil_scoped_release release;  // `a` is held by the caller for the whole call
                w.add_section(name, dtype, std::move(shape), data, size);
            },
            py::arg("name"), py::arg("array"))
        .def("add_strings", &StoreWriter::add_strings, py::arg("name"), py::arg("values"),
             py::call_guard<py::gil_scoped_release>())
        .def(
            "begin_features",
            [](StoreWriter& w, const std::string& column, const py::dtype& dtype, std::uint64_t segments,
               std::uint64_t channels) {
                w.begin_features(column, from_numpy(dtype, column.c_str()), segments, channels);
            },
            py::arg("column"), py::arg("dtype"), py::arg("segments"), py::arg("channels"))
        .def(
            "append_features",
            [](StoreWriter& w, const py::array& a) {
                require_contiguous(a, "feature rows");
                const auto size = static_cast<std::size_t>(a.nbytes());
                const void* data = a.data();
                py::gil_scoped_release release;  // `a` is held by the caller for the whole call
                w.append_features(data, size);
            },
            py::arg("rows"))
        .def("set_feature_stats", &StoreWriter::set_feature_stats, py::arg("mean_then_std"))
        .def("end_features", &StoreWriter::end_features, py::arg("row_counts") = std::vector<std::int64_t>{})
        .def("commit", &StoreWriter::commit, py::call_guard<py::gil_scoped_release>())
        .def("discard", &StoreWriter::discard);

    m.def("valid_column_name", &finegym::schema::valid_column_name, py::arg("name"),
          "True when `name` is 1..40 characters of [A-Za-z0-9_-].");
}
