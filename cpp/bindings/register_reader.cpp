// StoreReader -> finegym_store._core.Reader. Every array handed out is a
// read-only view whose numpy base is the Reader object, so the mapping stays
// alive as long as any view does: into the mapping (checked against
// truncation when handed out), or, for offsets sections, into the copies the
// reader validated at open.
#include <pybind11/pybind11.h>

#include "bindings.hpp"
#include "finegym/reader.hpp"

using finegym::DType;
using finegym::StoreReader;

py::dtype to_numpy(DType t) { return py::dtype(finegym::dtype_name(t)); }

DType from_numpy(const py::dtype& dt, const char* what) {
    // Fast path without Python code (str() of a dtype runs numpy's Python
    // code, tens of microseconds per gather): numpy's built-in dtypes in
    // native byte order are singletons, so identity decides.
    constexpr int kNpyHalf = 23;  // NPY_HALF
    if (dt.is(py::dtype::of<float>())) return DType::Float32;
    if (dt.is(py::dtype(kNpyHalf))) return DType::Float16;
    if (dt.is(py::dtype::of<std::uint8_t>())) return DType::UInt8;
    if (dt.is(py::dtype::of<std::int32_t>())) return DType::Int32;
    if (dt.is(py::dtype::of<std::int64_t>())) return DType::Int64;
    const std::string name = py::str(dt).cast<std::string>();
    try {
        return finegym::dtype_from_name(name);
    } catch (const std::invalid_argument&) {
        throw py::value_error(std::string(what) + " has dtype " + name +
                              "; expected one of uint8, int32, int64, float16, float32");
    }
}

namespace {

py::array readonly_view(py::handle owner, DType dtype, std::vector<py::ssize_t> shape, const unsigned char* data) {
    const auto item = static_cast<py::ssize_t>(finegym::dtype_size(dtype));
    std::vector<py::ssize_t> strides(shape.size());
    py::ssize_t stride = item;
    for (std::size_t i = shape.size(); i-- > 0;) {
        strides[i] = stride;
        stride *= shape[i];
    }
    // The const_cast is safe: the array is flagged read-only below, and the
    // mapping itself is PROT_READ, so numpy cannot write through it.
    py::array out(to_numpy(dtype), std::move(shape), std::move(strides),
                  const_cast<unsigned char*>(data), owner);
    // numpy.ndarray.setflags, looked up once and called unbound with
    // positional arguments: the cheapest public way to clear the flag.
    PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> setflags;
    const py::object& clear = setflags
        .call_once_and_store_result([] { return py::module_::import("numpy").attr("ndarray").attr("setflags"); })
        .get_stored();
    clear(out, false);
    return out;
}

std::vector<py::ssize_t> to_ssize(const std::vector<std::uint64_t>& v) {
    return {v.begin(), v.end()};
}

}  // namespace

void register_reader(py::module_& m) {
    // The section names of the schema (format.hpp), spelled once for Python.
    namespace sc = finegym::schema;
    py::dict sections;
    sections["ids"] = std::string(sc::kIds);
    sections["labels"] = std::string(sc::kLabels);
    sections["meta_video"] = std::string(sc::kMetaVideo);
    py::tuple meta_ints(sc::kMetaInts.size());
    for (std::size_t i = 0; i < sc::kMetaInts.size(); ++i) meta_ints[i] = std::string(sc::kMetaInts[i]);
    sections["meta_ints"] = meta_ints;  // event_start, event_end, element_start, element_end
    sections["feature_prefix"] = std::string(sc::kFeaturePrefix);
    sections["offsets_suffix"] = std::string(sc::kOffsetsSuffix);
    sections["data_suffix"] = std::string(sc::kDataSuffix);
    sections["blocks_suffix"] = std::string(sc::kBlocksSuffix);  // version 2: features/COL/blocks
    sections["stats_suffix"] = std::string(sc::kStatsSuffix);    // version 3: features/COL/stats
    py::tuple class_ints(sc::kClassInts.size());
    for (std::size_t i = 0; i < sc::kClassInts.size(); ++i) class_ints[i] = std::string(sc::kClassInts[i]);
    sections["class_ints"] = class_ints;  // label, glabel, set
    py::tuple class_strings(sc::kClassStrings.size());
    for (std::size_t i = 0; i < sc::kClassStrings.size(); ++i) class_strings[i] = std::string(sc::kClassStrings[i]);
    sections["class_strings"] = class_strings;  // name, event
    sections["attrs"] = std::string(sc::kAttrs);
    m.attr("SECTIONS") = sections;

    py::class_<StoreReader>(m, "Reader", "A memory-mapped store (internal; see finegym_store.Store).")
        .def(py::init([](const std::string& path) {
                 py::gil_scoped_release release;  // opening touches only C++ state and the file
                 return std::make_unique<StoreReader>(path);
             }),
             py::arg("path"))
        .def_property_readonly("path", &StoreReader::path)
        .def_property_readonly("file_size", &StoreReader::file_size)
        .def_property_readonly("version", [](const StoreReader& r) { return r.header().version; })
        .def("__len__", [](const StoreReader& r) { return r.num_instances(); })
        .def_property_readonly("num_classes",
                               [](const StoreReader& r) -> py::object {
                                   if (!r.schema().has_classes) return py::none();
                                   return py::int_(r.schema().num_classes);
                               })
        .def_property_readonly("has_attrs", [](const StoreReader& r) { return r.schema().has_attrs; })
        .def("sections",
             [](const StoreReader& r) {
                 py::list out;
                 for (const auto& s : r.sections()) {
                     py::dict d;
                     d["name"] = s.name;
                     d["dtype"] = finegym::dtype_name(s.dtype);
                     d["shape"] = py::tuple(py::cast(s.shape));
                     d["offset"] = s.offset;
                     d["length"] = s.length;
                     d["checksum"] = s.checksum;
                     out.append(d);
                 }
                 return out;
             })
        .def("has_section", [](const StoreReader& r, const std::string& name) { return r.find(name) != nullptr; })
        .def(
            "section",
            [](py::object self, const std::string& name) {
                const auto& r = self.cast<const StoreReader&>();
                const auto& s = r.section(name);
                if (s.dtype == DType::Int64 && name.size() > finegym::schema::kOffsetsSuffix.size() &&
                    std::string_view(name).substr(name.size() - finegym::schema::kOffsetsSuffix.size()) ==
                        finegym::schema::kOffsetsSuffix) {
                    const auto& copy = r.offsets(s);  // validated at open; immune to changes of the file
                    return readonly_view(self, s.dtype, to_ssize(s.shape),
                                         reinterpret_cast<const unsigned char*>(copy.data()));
                }
                r.check_not_truncated("a view of this section");
                return readonly_view(self, s.dtype, to_ssize(s.shape), r.bytes(s));
            },
            py::arg("name"),
            "Read-only view of a whole section (offsets sections: of the copy validated at open).")
        .def(
            "read_bytes",
            [](const StoreReader& r, const std::string& name, std::uint64_t begin, std::uint64_t end) {
                const auto& s = r.section(name);
                if (begin > end || end > s.length)
                    throw std::out_of_range("bytes [" + std::to_string(begin) + ", " + std::to_string(end) +
                                            ") are not inside section '" + name + "' of '" + r.path() + "'");
                py::bytes out(nullptr, static_cast<py::ssize_t>(end - begin));
                char* dst = PyBytes_AS_STRING(out.ptr());
                {
                    py::gil_scoped_release release;  // copies mapped bytes into `out`, which we hold
                    r.copy_bytes(s, begin, end, dst);
                }
                return out;
            },
            py::arg("name"), py::arg("begin"), py::arg("end"),
            "A copy of bytes [begin, end) of a section: OSError naming the file, not a crash, if the file "
            "was truncated under the mapping.")
        .def("columns",
             [](const StoreReader& r) {
                 py::list out;
                 for (const auto& c : r.schema().columns) {
                     py::object t = c.ragged() ? py::object(py::none()) : py::object(py::int_(c.segments));
                     out.append(py::make_tuple(c.name, finegym::dtype_name(c.dtype), t, c.channels));
                 }
                 return out;
             })
        .def(
            "features",
            [](py::object self, const std::string& column, std::int64_t i) {
                const auto& r = self.cast<const StoreReader&>();
                const auto& col = r.column(column);
                const auto rows = r.instance(col, i);
                r.check_not_truncated("a view of these features");
                return readonly_view(self, col.dtype,
                                     {static_cast<py::ssize_t>(rows.rows), static_cast<py::ssize_t>(col.channels)},
                                     rows.data);
            },
            py::arg("column"), py::arg("index"), "Read-only (T_i, C) view of one instance.")
        .def(
            "stats",
            [](const StoreReader& r, const std::string& column) -> py::object {
                const auto& col = r.column(column);
                if (!col.has_stats) return py::none();
                const auto c = static_cast<py::ssize_t>(col.channels);
                py::array_t<float> mean(c), std_dev(c);
                std::copy(col.mean.begin(), col.mean.end(), mean.mutable_data());
                std::copy(col.std_dev.begin(), col.std_dev.end(), std_dev.mutable_data());
                return py::make_tuple(mean, std_dev);
            },
            py::arg("column"),
            "(mean, std) float32 arrays of C values, copies of the column's statistics as read at open; None for "
            "a store of format version 1 or 2.")
        .def(
            "verify",
            [](const StoreReader& r) {
                py::gil_scoped_release release;  // hashes the mapping only; no Python objects touched
                return r.verify();
            },
            "Names of sections whose checksum does not match (empty when intact).");
}
