// Baselines for benchmarks/ (not part of the API): the plain native ways to
// move the same bytes, so that gather's speed is reported as a ratio against
// an honest reference rather than against a Python loop.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>
#include <vector>

#include "bindings.hpp"
#include "finegym/errors.hpp"

namespace {

using Offsets = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

}  // namespace

void register_baselines(py::module_& m) {
    auto b = m.def_submodule("_baselines", "Native baselines for the benchmarks (internal).");

    b.def(
        "memcpy_records",
        [](py::buffer src, Offsets offsets, std::size_t record_bytes, py::buffer out) {
            py::buffer_info s = src.request(), o = out.request(true);
            const auto n = static_cast<std::size_t>(offsets.size());
            const auto src_size = static_cast<std::size_t>(s.size * s.itemsize);
            if (static_cast<std::size_t>(o.size * o.itemsize) < n * record_bytes)
                throw py::value_error("out is smaller than offsets.size * record_bytes");
            const std::int64_t* off = offsets.data();
            for (std::size_t i = 0; i < n; ++i)
                if (off[i] < 0 || static_cast<std::size_t>(off[i]) + record_bytes > src_size)
                    throw py::index_error("record " + std::to_string(i) + " lies outside src");
            const auto* from = static_cast<const unsigned char*>(s.ptr);
            auto* to = static_cast<unsigned char*>(o.ptr);
            py::gil_scoped_release release;  // raw buffers held by the caller
            for (std::size_t i = 0; i < n; ++i)
                std::memcpy(to + i * record_bytes, from + off[i], record_bytes);
        },
        py::arg("src"), py::arg("offsets"), py::arg("record_bytes"), py::arg("out"),
        "Single-threaded memcpy of records src[offsets[i]:+record_bytes] into out, back to back.");

    b.def(
        "pread_records",
        [](const std::string& path, Offsets offsets, std::size_t record_bytes, py::buffer out, unsigned depth) {
            py::buffer_info o = out.request(true);
            const auto n = static_cast<std::size_t>(offsets.size());
            if (static_cast<std::size_t>(o.size * o.itemsize) < n * record_bytes)
                throw py::value_error("out is smaller than offsets.size * record_bytes");
            if (depth == 0) throw py::value_error("depth must be at least 1");
            const std::int64_t* off = offsets.data();
            auto* to = static_cast<unsigned char*>(o.ptr);
            const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
            if (fd < 0) finegym::throw_io_error("open", path);
            std::atomic<std::size_t> next{0};
            std::atomic<int> failed{0};
            {
                py::gil_scoped_release release;  // raw buffers held by the caller
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
            ::close(fd);
            if (failed) throw py::value_error("a pread failed or hit the end of '" + path + "'");
        },
        py::arg("path"), py::arg("offsets"), py::arg("record_bytes"), py::arg("out"), py::arg("depth") = 32,
        "pread of the records at queue depth `depth` (one thread per outstanding read).");
}
