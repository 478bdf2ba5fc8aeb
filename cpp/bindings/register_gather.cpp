// Batch gathering: finegym_store._core.gather (blocking) and
// finegym_store._core.GatherJob (runs in the background; the loader's
// prefetch). The job itself (its thread, fork rules, waiting) is
// finegym::GatherJob in the core; this file parses arguments, keeps the
// Python objects alive and releases the GIL.
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

finegym::SampleMode parse_mode(const std::string& mode) {
    if (mode == "test") return finegym::SampleMode::Test;
    if (mode == "train") return finegym::SampleMode::Train;
    throw py::value_error("mode must be 'train' or 'test', got '" + mode + "'");
}

finegym::Sampling parse_sampling(const std::string& sampling) {
    if (sampling == "mmaction2") return finegym::Sampling::MMAction2;
    if (sampling == "exact") return finegym::Sampling::Exact;
    throw py::value_error("sampling must be 'mmaction2' or 'exact', got '" + sampling + "'");
}

finegym::Prefetch parse_prefetch(const std::string& prefetch) {
    if (prefetch == "auto") return finegym::Prefetch::Auto;
    if (prefetch == "on") return finegym::Prefetch::On;
    if (prefetch == "off") return finegym::Prefetch::Off;
    throw py::value_error("prefetch must be 'auto', 'on' or 'off', got '" + prefetch + "'");
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

GatherSpec make_spec(const py::object& num_segments, const std::string& mode, std::uint64_t seed,
                     std::uint64_t epoch, std::uint64_t clip_len, const py::dtype& dtype, unsigned threads,
                     const std::string& sampling) {
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
    spec.mode = parse_mode(mode);
    spec.sampling = parse_sampling(sampling);
    if (clip_len < 1) throw py::value_error("clip_len must be at least 1");
    spec.clip_len = clip_len;
    spec.seed = seed;
    spec.epoch = epoch;
    spec.out_dtype = from_numpy(dtype, "gather output");
    spec.threads = threads;
    return spec;
}

// Checks `out` against the batch and returns it, or allocates a fresh array.
py::array prepare_out(py::object out, std::size_t batch, std::uint64_t rows, std::uint64_t channels,
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
        return py::array(dtype, shape, data, raw);
    }
    auto arr = out.cast<py::array>();
    const bool shape_ok = arr.ndim() == 3 && arr.shape(0) == shape[0] && arr.shape(1) == shape[1] &&
                          arr.shape(2) == shape[2];
    if (!shape_ok || !arr.dtype().is(dtype) || !(arr.flags() & py::array::c_style) || !arr.writeable()) {
        std::string got = "(";
        for (py::ssize_t i = 0; i < arr.ndim(); ++i) got += (i ? ", " : "") + std::to_string(arr.shape(i));
        throw py::value_error("out must be a writeable C-contiguous " + py::str(dtype).cast<std::string>() +
                              " array of shape (" + std::to_string(batch) + ", " + std::to_string(rows) + ", " +
                              std::to_string(channels) + "), got " + py::str(arr.dtype()).cast<std::string>() +
                              " " + got + (arr.ndim() == 1 ? ",)" : ")"));
    }
    return arr;
}

// Python's handle on a finegym::GatherJob: holds the reader, indices and
// output alive for as long as the job may use them.
class PyGatherJob {
public:
    PyGatherJob(py::object reader, IndexArray indices, py::array out, const finegym::FeatureColumn& col,
                const GatherSpec& spec)
        : reader_(std::move(reader)), indices_(std::move(indices)), out_(std::move(out)) {
        job_ = std::make_unique<finegym::GatherJob>(reader_.cast<const StoreReader&>(), col, indices_.data(),
                                                    static_cast<std::size_t>(indices_.size()), spec,
                                                    out_.mutable_data());
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

    m.def(
        "gather",
        [](py::object reader, const std::string& column, py::object indices, py::object num_segments,
           const std::string& mode, std::uint64_t seed, std::uint64_t epoch, std::uint64_t clip_len, py::object out,
           py::dtype dtype, unsigned threads, const std::string& prefetch, const std::string& sampling) {
            const auto& r = reader.cast<const StoreReader&>();
            const auto& col = r.column(column);
            auto spec = make_spec(num_segments, mode, seed, epoch, clip_len, dtype, threads, sampling);
            spec.prefetch = parse_prefetch(prefetch);
            IndexArray idx_array = to_indices(indices);
            const auto batch = static_cast<std::size_t>(idx_array.size());
            const std::int64_t* idx = idx_array.data();
            finegym::check_indices(idx, batch, r.num_instances());  // before allocating
            py::array result = prepare_out(std::move(out), batch, finegym::output_rows(col, spec), col.channels, dtype);
            void* dst = result.mutable_data();
            {
                py::gil_scoped_release release;  // see the note at the top of this file
                finegym::gather(r, col, idx, batch, spec, dst, *finegym::ThreadPool::shared(threads));
            }
            return result;
        },
        py::arg("reader"), py::arg("column"), py::arg("indices"), py::arg("num_segments"), py::arg("mode"),
        py::arg("seed"), py::arg("epoch"), py::arg("clip_len"), py::arg("out"), py::arg("dtype"), py::arg("threads"),
        py::arg("prefetch") = "auto", py::arg("sampling") = "mmaction2");

    py::class_<PyGatherJob>(m, "GatherJob", "A gather running in the background (internal; see Store.loader).")
        .def(py::init([](py::object reader, const std::string& column, py::object indices, py::object num_segments,
                         const std::string& mode, std::uint64_t seed, std::uint64_t epoch, std::uint64_t clip_len,
                         py::object out, py::dtype dtype, unsigned threads, const std::string& sampling) {
                 const auto& r = reader.cast<const StoreReader&>();
                 const auto& col = r.column(column);
                 auto spec = make_spec(num_segments, mode, seed, epoch, clip_len, dtype, threads, sampling);
                 IndexArray idx = to_indices(indices);
                 // Index errors surface here, at submission, not later in wait().
                 finegym::check_indices(idx.data(), static_cast<std::size_t>(idx.size()), r.num_instances());
                 py::array result = prepare_out(std::move(out), static_cast<std::size_t>(idx.size()),
                                                finegym::output_rows(col, spec), col.channels, dtype);
                 return std::make_unique<PyGatherJob>(std::move(reader), std::move(idx), std::move(result), col, spec);
             }),
             py::arg("reader"), py::arg("column"), py::arg("indices"), py::arg("num_segments"), py::arg("mode"),
             py::arg("seed"), py::arg("epoch"), py::arg("clip_len"), py::arg("out"), py::arg("dtype"),
             py::arg("threads"), py::arg("sampling") = "mmaction2")
        .def("wait", &PyGatherJob::wait,
             "Block until done (GIL released); the output array, or the job's error. ForkedJobError (a "
             "RuntimeError) in a process forked after the job started.")
        .def_property_readonly("owned", &PyGatherJob::owned, "True in the process that started the job.")
        .def_property_readonly("done", &PyGatherJob::done,
                               "True once the gather has finished (wait() then returns at once); ForkedJobError "
                               "in a process forked after the job started.");

    m.def(
        "sample_segments",
        [](std::uint64_t T, std::uint64_t K, std::uint64_t L, const std::string& mode, std::uint64_t seed,
           std::uint64_t epoch, std::uint64_t index, const std::string& sampling) {
            const auto m_ = parse_mode(mode);
            const auto s_ = parse_sampling(sampling);
            if (T < 1 || K < 1 || L < 1) throw py::value_error("T, K and L must be at least 1");
            const std::uint64_t rows = finegym::clip_rows(K, L);  // ValueError when K * L is too large
            finegym::output_bytes(2, rows, 1, sizeof(std::uint64_t));  // two buffers below
            py::array_t<std::int64_t> out(static_cast<py::ssize_t>(rows));
            std::vector<std::uint64_t> segs(static_cast<std::size_t>(rows));
            finegym::sample_segments(T, K, L, m_, finegym::SampleKey{seed, epoch, index}, segs.data(), s_);
            auto w = out.mutable_unchecked<1>();
            for (std::size_t i = 0; i < segs.size(); ++i)
                w(static_cast<py::ssize_t>(i)) = static_cast<std::int64_t>(segs[i]);
            return out;
        },
        py::arg("T"), py::arg("K"), py::arg("L"), py::arg("mode"), py::arg("seed") = 0, py::arg("epoch") = 0,
        py::arg("index") = 0, py::arg("sampling") = "mmaction2",
        "Segment indices one instance would get (for tests and docs).");
    m.def("default_threads", &finegym::ThreadPool::default_threads);
    m.def("max_threads", &finegym::ThreadPool::max_threads, "The cap on a gather's threads (the number of cores).");
}
