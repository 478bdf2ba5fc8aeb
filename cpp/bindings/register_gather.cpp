// Batch gathering: finegym_store._core.GatherSpec (a validated spec, built
// once per finegym_store.SegmentSpec), finegym_store._core.gather (blocking)
// and finegym_store._core.GatherJob (runs in the background; the loader's
// prefetch). The job itself (its thread, fork rules, waiting) is
// finegym::GatherJob in the core; this file converts argument types, keeps
// the Python objects alive and releases the GIL.
//
// GIL: the C++ work reads only the mapping (owned by the Reader) and the
// indices, and writes only `out`; the Reader and both arrays are held as
// Python references for the whole call or job, so no Python object is
// touched while the GIL is released.
#include <unistd.h>

#include <limits>
#include <memory>

#include "bindings.hpp"
#include "finegym/gather.hpp"
#include "finegym/gather_job.hpp"

using finegym::GatherSpec;
using finegym::StoreReader;

namespace {

using IndexArray = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// Strings to the core's enums. finegym_store checks these choices (naming
// the argument) before they get here; these errors are for direct callers.
finegym::SampleMode parse_mode(const std::string& mode) {
    if (mode == "test") return finegym::SampleMode::Test;
    if (mode == "train") return finegym::SampleMode::Train;
    throw py::value_error("mode must be 'train' or 'test', got '" + mode + "'");
}

finegym::Sampling parse_rule(const std::string& rule) {
    if (rule == "mmaction2") return finegym::Sampling::MMAction2;
    if (rule == "exact") return finegym::Sampling::Exact;
    throw py::value_error("rule must be 'mmaction2' or 'exact', got '" + rule + "'");
}

finegym::Readahead parse_readahead(const std::string& readahead) {
    if (readahead == "auto") return finegym::Readahead::Auto;
    if (readahead == "on") return finegym::Readahead::On;
    if (readahead == "off") return finegym::Readahead::Off;
    throw py::value_error("readahead must be 'auto', 'on' or 'off', got '" + readahead + "'");
}

// The native spec from Python values (types only; finegym::validate checks
// what the values mean).
GatherSpec make_spec(const py::object& num_segments, const py::object& mode, std::uint64_t clip_len,
                     const std::string& rule, const py::object& dtype, std::uint64_t seed, bool normalize) {
    GatherSpec spec;
    if (!num_segments.is_none()) {
        if (!py::isinstance<py::int_>(num_segments) || py::isinstance<py::bool_>(num_segments))
            throw py::type_error("num_segments must be an int or None");
        const auto k = num_segments.cast<py::int_>();
        if (k < py::int_(1))
            throw py::value_error("num_segments must be at least 1 (or None for every segment), got " +
                                  py::str(k).cast<std::string>());
        if (k > py::int_(finegym::kMaxSampleCount))
            throw py::value_error("num_segments = " + py::str(k).cast<std::string>() + " is too large (at most 2^53)");
        spec.num_segments = k.cast<std::uint64_t>();
    }
    if (!mode.is_none()) spec.mode = parse_mode(mode.cast<std::string>());
    spec.clip_len = clip_len;
    spec.rule = parse_rule(rule);
    if (!dtype.is_none()) spec.out_dtype = from_numpy(py::dtype::from_args(dtype), "gather output");
    spec.seed = seed;
    spec.normalize = normalize;
    finegym::validate(spec);
    return spec;
}

// numpy's dtype for a gather output without a string lookup (per call).
py::dtype output_numpy_dtype(finegym::DType t) {
    constexpr int kNpyHalf = 23;  // NPY_HALF
    if (t == finegym::DType::Float32) return py::dtype::of<float>();
    if (t == finegym::DType::Float16) return py::dtype(kNpyHalf);
    return to_numpy(t);
}

const char* mode_name(const GatherSpec& spec) {
    if (!spec.mode) return nullptr;
    return *spec.mode == finegym::SampleMode::Train ? "train" : "test";
}

// Indices as a C-contiguous int64 array. Signed integers are taken as they
// are (negative ones count from the end); unsigned ones must be below 2^63
// (IndexError: they cannot be in range, and must not wrap to "from the end");
// bools, floats and anything else are a TypeError.
IndexArray to_indices(const py::handle& obj) {
    py::array a = py::array::ensure(obj);
    if (!a) throw py::type_error("indices must be a 1-D array of integers");
    if (a.ndim() != 1)
        throw py::type_error("indices must be a 1-D array of integers, got " + std::to_string(a.ndim()) + " dimensions");
    const char kind = a.dtype().kind();
    if (kind == 'u' && a.size() > 0) {
        auto u = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
        const std::uint64_t* p = u.data();
        for (py::ssize_t i = 0; i < u.size(); ++i)
            if (p[i] > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
                throw py::index_error("index " + std::to_string(p[i]) + " (position " + std::to_string(i) +
                                      ") is out of range");
    } else if (kind != 'i' && kind != 'u' && a.size() != 0) {
        throw py::type_error("indices must be integers, got an array of " + py::str(a.dtype()).cast<std::string>() +
                             (kind == 'b' ? " (bools are not indices)" : ""));
    }
    return IndexArray::ensure(a);  // a safe cast now (forcecast only lets uint64 through, checked above)
}

// An output array and the row stride the gather writes it with (bytes; 0:
// C-contiguous).
struct Output {
    py::array array;
    std::size_t row_stride = 0;
};

// Checks `out` against the batch and returns it, or allocates a fresh array.
// `out` may be C-contiguous, or have contiguous rows (last dimension of
// itemsize stride) at a row stride of at least C * itemsize and instances
// rows * row stride apart: a column slice big[:, :, off:off + C] of a
// C-contiguous (B, rows, wider) array, which concatenated gathers fill.
Output prepare_out(py::object out, std::size_t batch, std::uint64_t rows, std::uint64_t channels,
                   const py::dtype& dtype) {
    // ValueError, not MemoryError or a wrapped size, for an impossible output.
    finegym::output_bytes(batch, rows, channels, static_cast<std::size_t>(dtype.itemsize()));
    const std::vector<py::ssize_t> shape = {static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(rows),
                                            static_cast<py::ssize_t>(channels)};
    if (out.is_none()) {
        // numpy's own allocation (so malloc recycles it batch after batch
        // and numpy's huge-page advice applies), one page larger, and the
        // array starts at its first page boundary: page-aligned like the
        // features sections, so no row lands at the offset where memcpy is
        // slow (finegym::copy_row). The view's base keeps the memory alive.
        const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
        const std::size_t bytes = static_cast<std::size_t>(shape[0]) * static_cast<std::size_t>(shape[1]) *
                                  static_cast<std::size_t>(shape[2]) * static_cast<std::size_t>(dtype.itemsize());
        py::array_t<std::uint8_t> raw(static_cast<py::ssize_t>(bytes + page));
        auto* data = static_cast<unsigned char*>(raw.mutable_data());
        data += (page - reinterpret_cast<std::uintptr_t>(data) % page) % page;
        return {py::array(dtype, shape, data, raw), 0};
    }
    auto arr = out.cast<py::array>();
    const bool shape_ok = arr.ndim() == 3 && arr.shape(0) == shape[0] && arr.shape(1) == shape[1] &&
                          arr.shape(2) == shape[2];
    std::size_t row_stride = 0;
    bool layout_ok = (arr.flags() & py::array::c_style) != 0;
    if (shape_ok && !layout_ok) {
        // Strided rows: the last dimension contiguous, rows row_stride apart
        // (for one row per instance, numpy's stride of the rows dimension is
        // meaningless: the instances' stride is the row stride).
        const py::ssize_t item = dtype.itemsize();
        const py::ssize_t row = shape[1] > 1 ? arr.strides(1) : arr.strides(0);
        layout_ok = (shape[2] <= 1 || arr.strides(2) == item) && row >= shape[2] * item &&
                    (shape[0] <= 1 || arr.strides(0) == shape[1] * row);
        if (layout_ok) row_stride = static_cast<std::size_t>(row);
    }
    if (!shape_ok || !arr.dtype().is(dtype) || !layout_ok || !arr.writeable()) {
        std::string got = "(";
        for (py::ssize_t i = 0; i < arr.ndim(); ++i) got += (i ? ", " : "") + std::to_string(arr.shape(i));
        std::string strides = "(";
        for (py::ssize_t i = 0; i < arr.ndim(); ++i) strides += (i ? ", " : "") + std::to_string(arr.strides(i));
        throw py::value_error("out must be a writeable " + py::str(dtype).cast<std::string>() + " array of shape (" +
                              std::to_string(batch) + ", " + std::to_string(rows) + ", " + std::to_string(channels) +
                              "), C-contiguous or a column slice out[:, :, a:b] of a C-contiguous array, got " +
                              (arr.writeable() ? "" : "a read-only ") + py::str(arr.dtype()).cast<std::string>() +
                              " " + got + (arr.ndim() == 1 ? ",)" : ")") + " with strides " + strides +
                              (arr.ndim() == 1 ? ",)" : ")"));
    }
    return {arr, row_stride};
}

// Python's handle on a finegym::GatherJob: holds the reader, indices and
// output alive for as long as the job may use them.
class PyGatherJob {
public:
    PyGatherJob(py::object reader, IndexArray indices, Output out, const finegym::FeatureColumn& col,
                const GatherSpec& spec, const finegym::GatherOptions& options)
        : reader_(std::move(reader)), indices_(std::move(indices)), out_(std::move(out.array)) {
        job_ = std::make_unique<finegym::GatherJob>(reader_.cast<const StoreReader&>(), col, indices_.data(),
                                                    static_cast<std::size_t>(indices_.size()), spec, options,
                                                    out_.mutable_data(), out.row_stride);
    }
    ~PyGatherJob() {
        // In the owning process this waits for the job (GIL released: it may
        // take a while and needs no Python); in a forked child it returns at once.
        py::gil_scoped_release release;
        job_.reset();
    }
    PyGatherJob(const PyGatherJob&) = delete;
    PyGatherJob& operator=(const PyGatherJob&) = delete;

    py::array wait() {
        {
            py::gil_scoped_release release;  // see the note at the top of this file
            job_->wait();
        }
        return out_;
    }
    bool owned() const noexcept { return job_->owned(); }
    bool done() const { return job_->done(); }

private:
    py::object reader_;
    IndexArray indices_;
    py::array out_;
    std::unique_ptr<finegym::GatherJob> job_;  // last: destroyed (waited for) first
};

}  // namespace

void register_gather(py::module_& m) {
    py::register_exception<finegym::ForkedJobError>(m, "ForkedJobError", PyExc_RuntimeError);

    py::class_<GatherSpec>(m, "GatherSpec",
                           "The native form of finegym_store.SegmentSpec: built (and validated) once, passed to "
                           "every gather.")
        .def(py::init(&make_spec), py::arg("num_segments"), py::arg("mode"), py::arg("clip_len"), py::arg("rule"),
             py::arg("dtype"), py::arg("seed"), py::arg("normalize") = false)
        .def_property_readonly("num_segments",
                               [](const GatherSpec& s) -> py::object {
                                   if (s.num_segments == 0) return py::none();
                                   return py::int_(s.num_segments);
                               })
        .def_property_readonly("mode", [](const GatherSpec& s) -> py::object {
            const char* m_ = mode_name(s);
            return m_ ? py::object(py::str(m_)) : py::object(py::none());
        })
        .def_readonly("clip_len", &GatherSpec::clip_len)
        .def_property_readonly("rule",
                               [](const GatherSpec& s) {
                                   return s.rule == finegym::Sampling::Exact ? "exact" : "mmaction2";
                               })
        .def_property_readonly("dtype", [](const GatherSpec& s) -> py::object {
            if (!s.out_dtype) return py::none();
            return to_numpy(*s.out_dtype);
        })
        .def_readonly("seed", &GatherSpec::seed)
        .def_readonly("normalize", &GatherSpec::normalize);

    m.def(
        "gather",
        [](py::object reader, const std::string& column, py::object indices, const GatherSpec& spec,
           std::uint64_t epoch, py::object out, unsigned threads, const std::string& readahead) {
            const auto& r = reader.cast<const StoreReader&>();
            const auto& col = r.column(column);
            const finegym::GatherOptions options{epoch, threads, parse_readahead(readahead)};
            IndexArray idx_array = to_indices(indices);
            const auto batch = static_cast<std::size_t>(idx_array.size());
            const std::int64_t* idx = idx_array.data();
            Output result = prepare_out(std::move(out), batch, finegym::output_rows(col, spec), col.channels,
                                        output_numpy_dtype(finegym::output_dtype(col, spec)));
            void* dst = result.array.mutable_data();
            {
                py::gil_scoped_release release;  // see the note at the top of this file
                // Indices are range-checked here, before anything is copied.
                finegym::gather(r, col, idx, batch, spec, options, dst, *finegym::ThreadPool::shared(threads),
                                result.row_stride);
            }
            return result.array;
        },
        py::arg("reader"), py::arg("column"), py::arg("indices"), py::arg("spec"), py::arg("epoch"), py::arg("out"),
        py::arg("threads"), py::arg("readahead") = "auto");

    py::class_<PyGatherJob>(m, "GatherJob", "A gather running in the background (internal; see Store.loader).")
        .def(py::init([](py::object reader, const std::string& column, py::object indices, const GatherSpec& spec,
                         std::uint64_t epoch, py::object out, unsigned threads, const std::string& readahead) {
                 const auto& r = reader.cast<const StoreReader&>();
                 const auto& col = r.column(column);
                 const finegym::GatherOptions options{epoch, threads, parse_readahead(readahead)};
                 IndexArray idx = to_indices(indices);
                 if (spec.normalize) finegym::check_normalizable(r, col);
                 Output result = prepare_out(std::move(out), static_cast<std::size_t>(idx.size()),
                                                finegym::output_rows(col, spec), col.channels,
                                                output_numpy_dtype(finegym::output_dtype(col, spec)));
                 // Index errors surface in the constructor (at submission), not later in wait().
                 return std::make_unique<PyGatherJob>(std::move(reader), std::move(idx), std::move(result), col, spec,
                                                      options);
             }),
             py::arg("reader"), py::arg("column"), py::arg("indices"), py::arg("spec"), py::arg("epoch"),
             py::arg("out"), py::arg("threads"), py::arg("readahead") = "auto")
        .def("wait", &PyGatherJob::wait,
             "Block until done (GIL released); the output array, or the job's error. ForkedJobError (a "
             "RuntimeError) in a process forked after the job started.")
        .def_property_readonly("owned", &PyGatherJob::owned, "True in the process that started the job.")
        .def_property_readonly("done", &PyGatherJob::done,
                               "True once the gather has finished (wait() then returns at once); ForkedJobError "
                               "in a process forked after the job started.");

    // Segment indices of one instance of T segments, by a spec or by its fields.
    auto sample = [](std::uint64_t T, const GatherSpec& spec, std::uint64_t epoch, std::uint64_t index) {
        if (spec.num_segments == 0) throw py::value_error("sample_segments needs num_segments=K");
        if (T < 1) throw py::value_error("T must be at least 1");
        const std::uint64_t rows = finegym::clip_rows(spec.num_segments, spec.clip_len);
        finegym::output_bytes(2, rows, 1, sizeof(std::uint64_t));  // two buffers below
        py::array_t<std::int64_t> out(static_cast<py::ssize_t>(rows));
        std::vector<std::uint64_t> segs(static_cast<std::size_t>(rows));
        finegym::sample_segments(T, spec.num_segments, spec.clip_len, *spec.mode,
                                 finegym::SampleKey{spec.seed, epoch, index}, segs.data(), spec.rule);
        auto w = out.mutable_unchecked<1>();
        for (std::size_t i = 0; i < segs.size(); ++i)
            w(static_cast<py::ssize_t>(i)) = static_cast<std::int64_t>(segs[i]);
        return out;
    };
    m.def("sample_segments", sample, py::arg("T"), py::arg("spec"), py::kw_only(), py::arg("epoch") = 0,
          py::arg("index") = 0, "Segment indices one instance would get (for tests and docs).");
    m.def(
        "sample_segments",
        [sample](std::uint64_t T, py::object num_segments, std::uint64_t clip_len, py::object mode,
                 std::uint64_t seed, std::uint64_t epoch, std::uint64_t index, const std::string& rule) {
            return sample(T, make_spec(num_segments, mode, clip_len, rule, py::none(), seed, false), epoch, index);
        },
        py::arg("T"), py::arg("num_segments"), py::arg("clip_len"), py::arg("mode"), py::kw_only(),
        py::arg("seed") = 0, py::arg("epoch") = 0, py::arg("index") = 0, py::arg("rule") = "mmaction2",
        "Segment indices one instance would get, the spec given by its fields.");
    m.def("default_threads", &finegym::ThreadPool::default_threads);
    m.def("max_threads", &finegym::ThreadPool::max_threads, "The cap on a gather's threads (the number of cores).");
}
