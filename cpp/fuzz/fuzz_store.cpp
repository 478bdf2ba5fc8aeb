// libFuzzer harness: open, verify, read and gather mutated stores.
//
// Build and run (README, "Development"):
//     CC=clang CXX=clang++ cmake -S . -B build/fuzz -G Ninja -DFINEGYM_FUZZ=ON && cmake --build build/fuzz
//     build/fuzz/fuzz_store -max_total_time=600 build/fuzz/corpus tests/data
//
// Each input is a whole store file. Before opening, the harness sets the
// header's file_size to the input's size and recomputes the header checksum,
// so mutations reach the checks behind them (section table, schema, layout,
// offsets) instead of all failing the checksum. A store that opens is then
// read the way users read it: every instance of every column, every string,
// verify(), gathers in both modes. Some inputs are then truncated under the
// mapping and read again: that must raise IoError, not SIGBUS.
//
// Expected outcomes are the exceptions of errors.hpp (FormatError, IoError,
// NotFound) and std::out_of_range / std::invalid_argument; anything else --
// a crash, a sanitizer report, another exception -- is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "finegym/errors.hpp"
#include "finegym/format.hpp"
#include "finegym/gather.hpp"
#include "finegym/hash.hpp"
#include "finegym/reader.hpp"
#include "finegym/thread_pool.hpp"

using namespace finegym;

namespace {

struct MemFile {
    int fd = -1;
    std::string path;
    MemFile() {
        fd = ::memfd_create("fuzz_store", 0);
        if (fd < 0) std::abort();
        path = "/proc/self/fd/" + std::to_string(fd);
    }
    ~MemFile() { ::close(fd); }
    void write(const unsigned char* data, std::size_t size) const {
        if (::ftruncate(fd, 0) != 0) std::abort();
        std::size_t done = 0;
        while (done < size) {
            const auto n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
            if (n <= 0) std::abort();
            done += static_cast<std::size_t>(n);
        }
    }
};

volatile unsigned char g_sink;

// Outcome counts, printed at exit (how deep the mutated inputs get).
struct Stats {
    std::uint64_t inputs = 0, opened = 0, truncated = 0;
    ~Stats() {
        std::fprintf(stderr, "fuzz_store: %llu inputs, %llu opened, %llu truncated under the mapping\n",
                     static_cast<unsigned long long>(inputs), static_cast<unsigned long long>(opened),
                     static_cast<unsigned long long>(truncated));
    }
} g_stats;

// What a (T_i, C) view exposes, read directly -- after the size check that
// the binding's features() makes before handing out a view.
void read_views(const StoreReader& r) {
    const auto n = r.num_instances();
    for (const auto& col : r.schema().columns) {
        const std::size_t row = col.channels * dtype_size(col.dtype);
        for (std::uint64_t i = 0; i < n && i < 4096; ++i) {
            r.check_not_truncated("fuzz view");
            const Rows rows = r.instance(col, static_cast<std::int64_t>(i));
            if (rows.rows == 0) std::abort();  // T > 0 is checked at open
            std::vector<unsigned char> buf(row);
            // First and last row: both must lie inside the mapping.
            std::memcpy(buf.data(), rows.data, row);
            std::memcpy(buf.data(), rows.data + (rows.rows - 1) * row, row);
            g_sink = buf[0];
        }
    }
}

template <typename Fn>
void expecting_errors(Fn&& fn) {
    try {
        fn();
    } catch (const FormatError&) {
    } catch (const IoError&) {
    } catch (const NotFound&) {
    } catch (const std::out_of_range&) {
    } catch (const std::invalid_argument&) {
    }
}

// The guarded paths: gather and string copies.
void read_guarded(const StoreReader& r, ThreadPool& pool) {
    const auto n = r.num_instances();
    for (const auto& col : r.schema().columns) {
        const std::size_t row = col.channels * dtype_size(col.dtype);
        std::vector<std::int64_t> idx;
        for (std::uint64_t i = 0; i < n && i < 8; ++i) idx.push_back(static_cast<std::int64_t>(i));
        idx.push_back(-1);
        for (auto mode : {SampleMode::Test, SampleMode::Train}) {
            GatherSpec spec;
            spec.num_segments = 3;
            spec.mode = mode;
            spec.out_dtype = (mode == SampleMode::Test) ? DType::Float32 : DType::Float16;
            GatherOptions options;
            options.threads = 1;
            std::vector<unsigned char> out(idx.size() * 3 * row * 2);
            gather(r, col, idx.data(), n == 0 ? 0 : idx.size(), spec, options, out.data(), pool);
            // Standardised (the statistics as the input gives them) into
            // rows with a gap after each, as a concatenated gather writes.
            if (!col.has_stats) continue;
            spec.normalize = true;
            spec.out_dtype = DType::Float32;
            const std::size_t stride = col.channels * 4 + 12;
            std::vector<unsigned char> strided(idx.size() * 3 * stride);
            expecting_errors([&] {
                gather(r, col, idx.data(), n == 0 ? 0 : idx.size(), spec, options, strided.data(), pool, stride);
            });
        }
    }
    for (const char* base : {"ids", "meta/video", "classes/name", "classes/event"}) {
        const Section* off = r.find(std::string(base) + "/offsets");
        if (off == nullptr) continue;
        const Section& data = r.section(std::string(base) + "/data");
        const auto& o = r.offsets(*off);
        std::string s;
        for (std::size_t i = 0; i + 1 < o.size() && i < 4096; ++i) {
            s.resize(static_cast<std::size_t>(o[i + 1] - o[i]));
            r.copy_bytes(data, static_cast<std::uint64_t>(o[i]), static_cast<std::uint64_t>(o[i + 1]), s.data());
        }
    }
}


}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static MemFile file;
    static ThreadPool pool(1);
    ++g_stats.inputs;
    std::vector<unsigned char> buf(data, data + size);
    if (buf.size() >= kHeaderSize) {
        const std::uint64_t file_size = buf.size();
        std::memcpy(buf.data() + hdr::file_size, &file_size, 8);
        std::uint64_t table_offset = 0;
        std::uint32_t count = 0;
        std::memcpy(&table_offset, buf.data() + hdr::table_offset, 8);
        std::memcpy(&count, buf.data() + hdr::num_sections, 4);
        const std::uint64_t table_size = std::uint64_t{count} * kSectionEntrySize;
        if (table_offset <= buf.size() && table_size <= buf.size() - table_offset) {
            const std::uint64_t sum =
                header_checksum(buf.data(), buf.data() + table_offset, static_cast<std::size_t>(table_size));
            std::memcpy(buf.data() + hdr::checksum, &sum, 8);
        }
    }
    file.write(buf.data(), buf.size());
    std::unique_ptr<StoreReader> reader;
    expecting_errors([&] { reader = std::make_unique<StoreReader>(file.path); });
    if (!reader) return 0;
    ++g_stats.opened;
    expecting_errors([&] { reader->verify(); });
    expecting_errors([&] { read_views(*reader); });
    expecting_errors([&] { read_guarded(*reader, pool); });
    // Truncate under the mapping (a quarter of the inputs, at a point the
    // input chooses): verify and gather must raise IoError, not crash.
    const std::uint64_t pick = hash64(data, size);
    if (pick % 4 == 0) {
        const std::uint64_t cut = ((pick >> 8) & 0xff) * buf.size() / 256;
        if (::ftruncate(file.fd, static_cast<off_t>(cut)) != 0) std::abort();
        ++g_stats.truncated;
        expecting_errors([&] { reader->verify(); });
        expecting_errors([&] { read_views(*reader); });
        expecting_errors([&] { read_guarded(*reader, pool); });
    }
    return 0;
}
