// finegym_store._bench: baselines for benchmarks/ (not part of the API, and
// not in the user's _core): the plain native ways to move the same bytes, so
// that gather's speed is reported as a ratio against an honest reference
// rather than against a Python loop.
//
// Every buffer must be C-contiguous (its bytes in memory order) and every
// argument is checked before a byte moves: offsets must be an int64 array,
// records must lie inside src, out must be writeable and large enough.
#include <fcntl.h>
#include <unistd.h>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "finegym/errors.hpp"
#include "finegym/thread_pool.hpp"

namespace py = pybind11;

namespace {

// A C-contiguous view of a buffer, released on destruction.
class ContiguousBuffer {
public:
    ContiguousBuffer(const py::object& obj, bool writable, const char* name) {
        const int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
            PyErr_Clear();
            throw py::type_error(std::string(name) + " must be a " + (writable ? "writeable " : "") +
                                 "buffer (e.g. a numpy array)");
        }
        held_ = true;
        if (view_.format != nullptr && std::strchr(view_.format, 'O') != nullptr) {
            PyBuffer_Release(&view_);
            held_ = false;
            throw py::type_error(std::string(name) + " must hold plain bytes, not Python object pointers");
        }
        if (!PyBuffer_IsContiguous(&view_, 'C')) {
            PyBuffer_Release(&view_);
            held_ = false;
            throw py::value_error(std::string(name) + " must be C-contiguous (a strided view is not read in order)");
        }
    }
    ~ContiguousBuffer() {
        if (held_) PyBuffer_Release(&view_);
    }
    ContiguousBuffer(const ContiguousBuffer&) = delete;
    ContiguousBuffer& operator=(const ContiguousBuffer&) = delete;
    unsigned char* data() const { return static_cast<unsigned char*>(view_.buf); }
    std::size_t bytes() const { return static_cast<std::size_t>(view_.len); }

private:
    Py_buffer view_{};
    bool held_ = false;
};

// offsets: a 1-D int64 array (no silent cast from floats, bools or uint64).
py::array_t<std::int64_t, py::array::c_style> as_offsets(const py::object& offsets) {
    py::array a = py::array::ensure(offsets);
    if (!a || a.ndim() != 1 || a.dtype().kind() != 'i')
        throw py::type_error("offsets must be a 1-D array of signed integers");
    return py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

// Checks that n records of record_bytes fit in out, and each offset + record
// lies in [0, limit) (limit: the source's size); returns n.
std::size_t check_records(const std::int64_t* off, std::size_t n, std::size_t record_bytes, std::size_t out_bytes,
                          std::uint64_t limit, const char* source) {
    if (record_bytes == 0) throw py::value_error("record_bytes must be at least 1");
    if (n > out_bytes / record_bytes)
        throw py::value_error("out (" + std::to_string(out_bytes) + " bytes) is smaller than offsets.size * "
                              "record_bytes = " + std::to_string(n) + " * " + std::to_string(record_bytes));
    for (std::size_t i = 0; i < n; ++i)
        if (off[i] < 0 || static_cast<std::uint64_t>(off[i]) > limit || limit - static_cast<std::uint64_t>(off[i]) < record_bytes)
            throw py::index_error("record " + std::to_string(i) + " (offset " + std::to_string(off[i]) +
                                  ") lies outside " + source + " (" + std::to_string(limit) + " bytes)");
    return n;
}

struct FileCloser {
    int fd;
    ~FileCloser() { ::close(fd); }
};

}  // namespace

PYBIND11_MODULE(_bench, m) {
    m.doc() = "Native baselines for finegym-store's benchmarks (internal).";

    m.def(
        "memcpy_records",
        [](const py::object& src, const py::object& offsets, std::size_t record_bytes, const py::object& out) {
            ContiguousBuffer s(src, false, "src"), o(out, true, "out");
            const auto offs = as_offsets(offsets);
            const std::int64_t* off = offs.data();
            const std::size_t n = check_records(off, static_cast<std::size_t>(offs.size()), record_bytes, o.bytes(),
                                                s.bytes(), "src");
            const unsigned char* from = s.data();
            unsigned char* to = o.data();
            py::gil_scoped_release release;  // raw buffers, held by the views above
            for (std::size_t i = 0; i < n; ++i)
                std::memcpy(to + i * record_bytes, from + off[i], record_bytes);
        },
        py::arg("src"), py::arg("offsets"), py::arg("record_bytes"), py::arg("out"),
        "Single-threaded memcpy of records src[offsets[i]:+record_bytes] into out, back to back.");

    m.def(
        "memcpy_records_parallel",
        [](const py::object& src, const py::object& offsets, std::size_t record_bytes, const py::object& out,
           unsigned threads) {
            ContiguousBuffer s(src, false, "src"), o(out, true, "out");
            const auto offs = as_offsets(offsets);
            const std::int64_t* off = offs.data();
            const std::size_t n = check_records(off, static_cast<std::size_t>(offs.size()), record_bytes, o.bytes(),
                                                s.bytes(), "src");
            const unsigned char* from = s.data();
            unsigned char* to = o.data();
            const unsigned parts = std::max(1u, std::min(threads, finegym::ThreadPool::max_threads()));
            auto pool = finegym::ThreadPool::shared(parts);
            py::gil_scoped_release release;  // raw buffers, held by the views above
            // The same persistent pool and split as gather's copy: contiguous runs of records per thread.
            pool->parallel_for(parts, [&](std::size_t p) {
                const std::size_t begin = n * p / parts, end = n * (p + 1) / parts;
                for (std::size_t i = begin; i < end; ++i)
                    std::memcpy(to + i * record_bytes, from + off[i], record_bytes);
            }, parts);
        },
        py::arg("src"), py::arg("offsets"), py::arg("record_bytes"), py::arg("out"), py::arg("threads"),
        "memcpy_records on `threads` threads of the persistent pool gather uses (a bound for gather's copy).");

    m.def(
        "pread_records",
        [](const std::string& path, const py::object& offsets, std::size_t record_bytes, const py::object& out,
           unsigned depth) {
            ContiguousBuffer o(out, true, "out");
            const auto offs = as_offsets(offsets);
            if (depth == 0 || depth > 1024) throw py::value_error("depth must be in [1, 1024]");
            const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
            if (fd < 0) finegym::throw_io_error("open", path);
            const FileCloser closer{fd};
            const off_t end = ::lseek(fd, 0, SEEK_END);
            if (end < 0) finegym::throw_io_error("lseek", path);
            const std::int64_t* off = offs.data();
            const std::size_t n = check_records(off, static_cast<std::size_t>(offs.size()), record_bytes, o.bytes(),
                                                static_cast<std::uint64_t>(end), ("'" + path + "'").c_str());
            unsigned char* to = o.data();
            std::atomic<std::size_t> next{0};
            std::atomic<int> failed{0};
            {
                py::gil_scoped_release release;  // raw buffers, held by the view above
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < depth; ++t) {
                    threads.emplace_back([&] {
                        for (std::size_t i; (i = next.fetch_add(1)) < n;) {
                            std::size_t done = 0;
                            while (done < record_bytes) {
                                const ssize_t r = ::pread(fd, to + i * record_bytes + done, record_bytes - done,
                                                          static_cast<off_t>(off[i]) + static_cast<off_t>(done));
                                if (r <= 0) {
                                    if (r < 0 && errno == EINTR) continue;
                                    failed = 1;
                                    return;
                                }
                                done += static_cast<std::size_t>(r);
                            }
                        }
                    });
                }
                for (auto& t : threads) t.join();
            }
            if (failed) throw py::value_error("a pread failed or hit the end of '" + path + "'");
        },
        py::arg("path"), py::arg("offsets"), py::arg("record_bytes"), py::arg("out"), py::arg("depth") = 32,
        "pread of the records at queue depth `depth` (one thread per outstanding read).");
}
