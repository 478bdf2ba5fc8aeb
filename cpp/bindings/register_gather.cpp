// Batch gathering: finegym_store._core.gather (blocking) and
// finegym_store._core.GatherJob (runs in the background; the loader's prefetch).
//
// GIL: the C++ work reads only the mapping (owned by the Reader) and writes
// only `out`; both arrays and the Reader are held as Python references for
// the whole call or job, so no Python object is touched while the GIL is
// released.
#include <thread>

#include "bindings.hpp"
#include "finegym/gather.hpp"

using finegym::GatherSpec;
using finegym::StoreReader;

namespace {

using IndexArray = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

GatherSpec make_spec(py::object num_segments, const std::string& mode, std::uint64_t seed, std::uint64_t epoch,
                     std::uint64_t clip_len, const py::dtype& dtype, unsigned threads) {
    GatherSpec spec;
    if (!num_segments.is_none()) {
        const auto k = num_segments.cast<std::int64_t>();
        if (k < 1) throw py::value_error("num_segments must be at least 1 (or None for every segment), got " +
                                         std::to_string(k));
        spec.num_segments = static_cast<std::uint64_t>(k);
    }
    if (mode == "test") {
        spec.mode = finegym::SampleMode::Test;
    } else if (mode == "train") {
        spec.mode = finegym::SampleMode::Train;
    } else {
        throw py::value_error("mode must be 'train' or 'test', got '" + mode + "'");
    }
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
    const std::vector<py::ssize_t> shape = {static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(rows),
                                            static_cast<py::ssize_t>(channels)};
    if (out.is_none()) return py::array(dtype, shape);
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

// A gather running on its own thread; wait() joins it (GIL released) and
// rethrows its error. The job holds the reader, indices and output alive.
class GatherJob {
public:
    GatherJob(py::object reader, std::string column, IndexArray indices, GatherSpec spec, py::array out)
        : reader_obj_(std::move(reader)), indices_(std::move(indices)), out_(std::move(out)) {
        // Plain pointers, captured by value: the reader (and so its columns)
        // is kept alive by reader_obj_, the buffers by indices_ and out_.
        const auto* r = &reader_obj_.cast<const StoreReader&>();
        const auto* col = &r->column(column);
        const std::int64_t* idx = indices_.data();
        const auto batch = static_cast<std::size_t>(indices_.size());
        void* dst = out_.mutable_data();
        thread_ = std::thread([this, r, col, idx, batch, spec, dst] {
            try {
                finegym::gather(*r, *col, idx, batch, spec, dst, *finegym::ThreadPool::shared(spec.threads));
            } catch (...) {
                error_ = std::current_exception();
            }
        });
    }
    ~GatherJob() {
        if (thread_.joinable()) {
            py::gil_scoped_release release;
            thread_.join();
        }
    }
    GatherJob(const GatherJob&) = delete;
    GatherJob& operator=(const GatherJob&) = delete;

    py::array wait() {
        if (thread_.joinable()) {
            py::gil_scoped_release release;
            thread_.join();
        }
        if (error_) std::rethrow_exception(error_);
        return out_;
    }

private:
    py::object reader_obj_;
    IndexArray indices_;
    py::array out_;
    std::exception_ptr error_;
    std::thread thread_;  // last: started after every member it reads is set
};

}  // namespace

void register_gather(py::module_& m) {
    m.def(
        "gather",
        [](py::object reader, const std::string& column, IndexArray indices, py::object num_segments,
           const std::string& mode, std::uint64_t seed, std::uint64_t epoch, std::uint64_t clip_len, py::object out,
           py::dtype dtype, unsigned threads, const std::string& prefetch) {
            const auto& r = reader.cast<const StoreReader&>();
            const auto& col = r.column(column);
            auto spec = make_spec(std::move(num_segments), mode, seed, epoch, clip_len, dtype, threads);
            if (prefetch == "on") {
                spec.prefetch = finegym::Prefetch::On;
            } else if (prefetch == "off") {
                spec.prefetch = finegym::Prefetch::Off;
            } else if (prefetch != "auto") {
                throw py::value_error("prefetch must be 'auto', 'on' or 'off', got '" + prefetch + "'");
            }
            const auto batch = static_cast<std::size_t>(indices.size());
            py::array result = prepare_out(std::move(out), batch, finegym::output_rows(col, spec), col.channels, dtype);
            void* dst = result.mutable_data();
            const std::int64_t* idx = indices.data();
            {
                py::gil_scoped_release release;  // see the note at the top of this file
                finegym::gather(r, col, idx, batch, spec, dst, *finegym::ThreadPool::shared(threads));
            }
            return result;
        },
        py::arg("reader"), py::arg("column"), py::arg("indices"), py::arg("num_segments"), py::arg("mode"),
        py::arg("seed"), py::arg("epoch"), py::arg("clip_len"), py::arg("out"), py::arg("dtype"), py::arg("threads"),
        py::arg("prefetch") = "auto");

    py::class_<GatherJob>(m, "GatherJob", "A gather running in the background (internal; see Store.loader).")
        .def(py::init([](py::object reader, const std::string& column, IndexArray indices, py::object num_segments,
                         const std::string& mode, std::uint64_t seed, std::uint64_t epoch, std::uint64_t clip_len,
                         py::object out, py::dtype dtype, unsigned threads) {
                 const auto& r = reader.cast<const StoreReader&>();
                 const auto& col = r.column(column);
                 auto spec = make_spec(std::move(num_segments), mode, seed, epoch, clip_len, dtype, threads);
                 // Index errors surface here, at submission, not later in wait().
                 finegym::check_indices(indices.data(), static_cast<std::size_t>(indices.size()), r.num_instances());
                 py::array result = prepare_out(std::move(out), static_cast<std::size_t>(indices.size()),
                                                finegym::output_rows(col, spec), col.channels, dtype);
                 return std::make_unique<GatherJob>(std::move(reader), column, std::move(indices), spec,
                                                    std::move(result));
             }),
             py::arg("reader"), py::arg("column"), py::arg("indices"), py::arg("num_segments"), py::arg("mode"),
             py::arg("seed"), py::arg("epoch"), py::arg("clip_len"), py::arg("out"), py::arg("dtype"),
             py::arg("threads"))
        .def("wait", &GatherJob::wait, "Block until done (GIL released); the output array, or the job's error.");

    m.def("sample_segments",
          [](std::uint64_t T, std::uint64_t K, std::uint64_t L, const std::string& mode, std::uint64_t seed,
             std::uint64_t epoch, std::uint64_t index) {
              if (T < 1 || K < 1 || L < 1) throw py::value_error("T, K and L must be at least 1");
              py::array_t<std::int64_t> out(static_cast<py::ssize_t>(K * L));
              std::vector<std::uint64_t> segs(K * L);
              finegym::sample_segments(T, K, L, mode == "train" ? finegym::SampleMode::Train : finegym::SampleMode::Test,
                                       finegym::SampleKey{seed, epoch, index}, segs.data());
              auto w = out.mutable_unchecked<1>();
              for (std::size_t i = 0; i < segs.size(); ++i) w(static_cast<py::ssize_t>(i)) = static_cast<std::int64_t>(segs[i]);
              return out;
          },
          py::arg("T"), py::arg("K"), py::arg("L"), py::arg("mode"), py::arg("seed") = 0, py::arg("epoch") = 0,
          py::arg("index") = 0, "Segment indices one instance would get (for tests and docs).");
    m.def("default_threads", &finegym::ThreadPool::default_threads);
}
