#include "finegym/gather.hpp"

#include "finegym/fault_guard.hpp"

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace finegym {

// ---- half precision ----------------------------------------------------------------
float half_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t mant = h & 0x3ffu;
    std::uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN (payload kept)
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;  // +-0
    } else {
        // Subnormal half: normalise.
        std::uint32_t e = 113;
        while ((mant & 0x400u) == 0) {
            mant <<= 1;
            --e;
        }
        bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

std::uint16_t float_to_half(float f) noexcept {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
    const std::uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // inf or NaN
        const std::uint16_t nan_bit = abs > 0x7f800000u ? static_cast<std::uint16_t>(0x200u | ((abs >> 13) & 0x3ffu)) : 0;
        return static_cast<std::uint16_t>(sign | 0x7c00u | nan_bit);
    }
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds past 65504: inf
    if (abs < 0x38800000u) {
        // Result is subnormal (or zero): shift the full mantissa, round half to even.
        if (abs < 0x33000000u) return sign;  // below half the smallest subnormal
        const std::uint32_t e = abs >> 23;
        const std::uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        const std::uint32_t shift = 126 - e;  // 14..24
        std::uint32_t q = m >> shift;
        const std::uint32_t rem = m & ((1u << shift) - 1);
        const std::uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return static_cast<std::uint16_t>(sign | q);
    }
    // Normal: rebias exponent, round mantissa from 23 to 10 bits, half to even.
    std::uint32_t h = ((abs >> 13) - (112u << 10));
    const std::uint32_t rem = abs & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
    return static_cast<std::uint16_t>(sign | h);
}

// ---- gather -----------------------------------------------------------------------------
std::uint64_t output_rows(const FeatureColumn& col, const GatherSpec& spec) {
    if (spec.clip_len == 0) throw std::invalid_argument("clip_len must be at least 1");
    if (spec.num_segments == 0) {
        if (col.ragged())
            throw std::invalid_argument("column '" + col.name +
                                        "' is ragged (T varies), so num_segments=None (all segments) cannot make "
                                        "a batch; pass num_segments=K");
        if (spec.clip_len != 1)
            throw std::invalid_argument("clip_len > 1 needs num_segments=K (clips of clip_len segments)");
        return col.segments;
    }
    return clip_rows(spec.num_segments, spec.clip_len);
}

std::size_t output_bytes(std::uint64_t batch, std::uint64_t rows, std::uint64_t channels, std::size_t itemsize) {
    const uint128_t elements_rows = static_cast<uint128_t>(batch) * rows;  // exact in 128 bits
    const auto pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    uint128_t limit = static_cast<uint128_t>(PTRDIFF_MAX);
    if (pages > 0 && page > 0)
        limit = std::min(limit, static_cast<uint128_t>(pages) * static_cast<std::uint64_t>(page));
    // bytes > limit  <=>  batch * rows > floor(limit / (channels * itemsize)), without overflow.
    if (channels != 0 && itemsize != 0 && elements_rows > limit / channels / itemsize)
        throw std::invalid_argument("a batch of " + std::to_string(batch) + " x " + std::to_string(rows) + " x " +
                                    std::to_string(channels) + " elements of " + std::to_string(itemsize) +
                                    " bytes is larger than this machine's memory; lower the batch size, "
                                    "num_segments or clip_len");
    return static_cast<std::size_t>(elements_rows * channels * itemsize);
}

namespace {

void convert_rows(const unsigned char* src, DType from, unsigned char* dst, DType to, std::size_t elements) {
    if (from == to) {
        std::memcpy(dst, src, elements * dtype_size(from));
    } else if (from == DType::Float16) {  // to float32
        for (std::size_t e = 0; e < elements; ++e) {
            std::uint16_t h;
            std::memcpy(&h, src + 2 * e, 2);
            const float f = half_to_float(h);
            std::memcpy(dst + 4 * e, &f, 4);
        }
    } else {  // float32 to float16
        for (std::size_t e = 0; e < elements; ++e) {
            float f;
            std::memcpy(&f, src + 4 * e, 4);
            const std::uint16_t h = float_to_half(f);
            std::memcpy(dst + 2 * e, &h, 2);
        }
    }
}

void advise_willneed(const unsigned char* begin, std::size_t bytes) {
    static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto first = reinterpret_cast<std::uintptr_t>(begin) & ~(page - 1);
    const auto last = reinterpret_cast<std::uintptr_t>(begin) + bytes;
    // Advice only: an error changes nothing about correctness, so it is ignored.
    ::madvise(reinterpret_cast<void*>(first), last - first, MADV_WILLNEED);
}

long major_faults() {
    struct rusage ru {};
    ::getrusage(RUSAGE_SELF, &ru);
    return ru.ru_majflt;
}

// Calls fn(first_row, run_length) for each run of consecutive segments.
template <typename Fn>
void for_each_run(const std::uint64_t* segs, std::uint64_t rows, Fn&& fn) {
    std::uint64_t r = 0;
    while (r < rows) {
        std::uint64_t run = 1;
        while (r + run < rows && segs[r + run] == segs[r] + run) ++run;
        fn(r, run);
        r += run;
    }
}

}  // namespace

void check_indices(const std::int64_t* indices, std::size_t batch, std::uint64_t num_instances) {
    const auto n = static_cast<std::int64_t>(num_instances);
    for (std::size_t b = 0; b < batch; ++b)
        if (indices[b] < -n || indices[b] >= n)
            throw std::out_of_range("index " + std::to_string(indices[b]) + " (position " + std::to_string(b) +
                                    ") is out of range for a store of " + std::to_string(n) + " instances");
}

void gather(const StoreReader& reader, const FeatureColumn& col, const std::int64_t* indices, std::size_t batch,
            const GatherSpec& spec, void* out, ThreadPool& pool) {
    if (spec.out_dtype != DType::Float32 && spec.out_dtype != DType::Float16)
        throw std::invalid_argument("gather output must be float32 or float16");
    const std::uint64_t rows_out = output_rows(col, spec);
    output_bytes(batch, rows_out, col.channels, dtype_size(spec.out_dtype));  // the caller's `out` has this size
    const auto n = static_cast<std::int64_t>(reader.num_instances());
    check_indices(indices, batch, reader.num_instances());
    std::vector<Rows> sources(batch);
    for (std::size_t b = 0; b < batch; ++b) sources[b] = reader.instance(col, indices[b]);
    if (batch == 0) return;
    const std::size_t in_row = col.channels * dtype_size(col.dtype);
    const std::size_t out_row = col.channels * dtype_size(spec.out_dtype);
    auto* dst = static_cast<unsigned char*>(out);
    const unsigned threads = spec.threads;
    const bool prefetch = spec.prefetch == Prefetch::On ||
                          (spec.prefetch == Prefetch::Auto && reader.cold_hint.load(std::memory_order_relaxed));

    // The segments of instance b, into `s` (rows_out entries).
    auto choose = [&](std::size_t b, std::uint64_t* s) {
        if (spec.num_segments == 0) {
            for (std::uint64_t r = 0; r < rows_out; ++r) s[r] = r;
            return;
        }
        std::int64_t i = indices[b];
        if (i < 0) i += n;
        sample_segments(sources[b].rows, spec.num_segments, spec.clip_len, spec.mode,
                        SampleKey{spec.seed, spec.epoch, static_cast<std::uint64_t>(i)}, s, spec.sampling);
    };
    thread_local std::vector<std::uint64_t> scratch;  // per-thread, reused across batches

    if (prefetch) {
        // Queue the reads of exactly the rows the batch needs, all at once,
        // so a cold file is read at a deep queue depth instead of one page
        // fault at a time. (Only then: on hot data the calls cost more than
        // they save, hence a separate pass.)
        pool.parallel_for(batch, [&](std::size_t b) {
            scratch.resize(rows_out);
            choose(b, scratch.data());
            for_each_run(scratch.data(), rows_out, [&](std::uint64_t r, std::uint64_t run) {
                advise_willneed(sources[b].data + scratch[r] * in_row, static_cast<std::size_t>(run) * in_row);
            });
        }, threads);
    }

    // Copy (and convert) runs of consecutive segments, one call each.
    // A file truncated under the mapping raises SIGBUS in the copy: the guard
    // (fault_guard.hpp) abandons that instance and the batch raises IoError.
    ensure_sigbus_handler();
    std::atomic<bool> faulted{false};
    const long faults_before = major_faults();
    pool.parallel_for(batch, [&](std::size_t b) {
        if (faulted.load(std::memory_order_relaxed)) return;
        scratch.resize(rows_out);
        choose(b, scratch.data());
        const unsigned char* src = sources[b].data;
        unsigned char* row_out = dst + b * rows_out * out_row;
        if (!guard_sigbus([&] {
            // Touch the first line of every page of every row up front: the
            // address translations (TLB misses, costly under virtualisation) and
            // first cache misses of all rows then overlap instead of queueing
            // behind each copy.
            for (std::uint64_t r = 0; r < rows_out; ++r)
                for (std::size_t off = 0; off < in_row; off += 4096) __builtin_prefetch(src + scratch[r] * in_row + off);
            for_each_run(scratch.data(), rows_out, [&](std::uint64_t r, std::uint64_t run) {
                convert_rows(src + scratch[r] * in_row, col.dtype, row_out + r * out_row, spec.out_dtype,
                             static_cast<std::size_t>(run) * col.channels);
            });
        }))
            faulted.store(true, std::memory_order_relaxed);
    }, threads);
    if (faulted.load()) throw_mapping_fault(reader.path(), "gather");
    // Auto prefetch: pages had to come from disk (major faults, counted for
    // the whole process: other threads' faults only err towards prefetching)
    // -> prefetch the next batch; a batch served from memory -> skip the
    // madvise calls, which cost more than the copy saves on hot data.
    reader.cold_hint.store(major_faults() != faults_before, std::memory_order_relaxed);
}

}  // namespace finegym
