#include "finegym/gather.hpp"

#include "finegym/fault_guard.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace finegym {

// ---- half precision ----------------------------------------------------------------
float half_to_float(std::uint16_t h) noexcept {
    // Exponent and mantissa moved into a float's fields, then scaled by
    // 2^112 (the difference of the exponent biases, 127 - 15): exact for
    // normal and subnormal halves alike. A result of 2^16 or more was Inf or
    // NaN in half precision: its exponent is set to all ones, keeping the
    // mantissa (so NaN payloads). Without branches, so loops over rows
    // vectorise.
    constexpr std::uint32_t kScaleBits = (254u - 15u) << 23;  // 2^112
    constexpr std::uint32_t kWasInfNan = (127u + 16u) << 23;  // 2^16
    float magic, was_inf_nan;
    std::memcpy(&magic, &kScaleBits, 4);
    std::memcpy(&was_inf_nan, &kWasInfNan, 4);
    std::uint32_t bits = static_cast<std::uint32_t>(h & 0x7fffu) << 13;
    float f;
    std::memcpy(&f, &bits, 4);
    f *= magic;
    std::memcpy(&bits, &f, 4);
    bits |= f >= was_inf_nan ? 0x7f800000u : 0u;
    bits |= static_cast<std::uint32_t>(h & 0x8000u) << 16;
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
void validate(const GatherSpec& spec) {
    if (spec.clip_len == 0) throw std::invalid_argument("clip_len must be at least 1");
    if (spec.out_dtype && *spec.out_dtype != DType::Float32 && *spec.out_dtype != DType::Float16)
        throw std::invalid_argument("dtype must be float32 or float16 (or None for the column's)");
    if (spec.num_segments == 0) {
        if (spec.clip_len != 1)
            throw std::invalid_argument("clip_len > 1 needs num_segments=K (clips of clip_len segments)");
        return;
    }
    if (!spec.mode)
        throw std::invalid_argument("num_segments=" + std::to_string(spec.num_segments) +
                                    " needs a mode: pass mode=\"train\" (training: a random segment in each part) "
                                    "or mode=\"test\" (evaluation: centred segments)");
    clip_rows(spec.num_segments, spec.clip_len);  // K * L within kMaxSampleCount
}

std::uint64_t output_rows(const FeatureColumn& col, const GatherSpec& spec) {
    if (spec.num_segments == 0) {
        if (col.ragged() && col.common_segments != 0) {
            const std::string t = std::to_string(col.common_segments);
            throw std::invalid_argument("column '" + col.name + "' is stored ragged, so num_segments=None (all "
                                        "segments) cannot make a batch, although every instance has T = " + t +
                                        ": pass num_segments=K, or import it again with length=" + t +
                                        " (finegym-store import --length " + t + ") to store it fixed-T");
        }
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

DType output_dtype(const FeatureColumn& col, const GatherSpec& spec) noexcept {
    return spec.out_dtype ? *spec.out_dtype : col.dtype;
}

std::size_t output_bytes(std::uint64_t batch, std::uint64_t rows, std::uint64_t channels, std::size_t itemsize) {
    const uint128_t elements_rows = static_cast<uint128_t>(batch) * rows;  // exact in 128 bits
    // Physical memory, read once (sysconf(_SC_PHYS_PAGES) is a sysinfo() call,
    // which walks every block device: too slow to make on each batch).
    static const uint128_t limit = [] {
        const auto pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
        uint128_t l = static_cast<uint128_t>(PTRDIFF_MAX);
        if (pages > 0 && page > 0)
            l = std::min(l, static_cast<uint128_t>(pages) * static_cast<std::uint64_t>(page));
        return l;
    }();
    // bytes > limit  <=>  batch * rows > floor(limit / (channels * itemsize)), without overflow.
    if (channels != 0 && itemsize != 0 && elements_rows > limit / channels / itemsize)
        throw std::invalid_argument("a batch of " + std::to_string(batch) + " x " + std::to_string(rows) + " x " +
                                    std::to_string(channels) + " elements of " + std::to_string(itemsize) +
                                    " bytes is larger than this machine's memory; lower the batch size, "
                                    "num_segments or clip_len");
    return static_cast<std::size_t>(elements_rows * channels * itemsize);
}

void copy_row(unsigned char* dst, const unsigned char* src, std::size_t bytes) noexcept {
    const auto distance = (reinterpret_cast<std::uintptr_t>(dst) - reinterpret_cast<std::uintptr_t>(src)) & 4095u;
    if (distance == 0 || distance >= 32 || bytes < 1024) {
        std::memcpy(dst, src, bytes);
        return;
    }
    // Backwards, a block at a time: each load is below the stores just made,
    // so none of them waits on one. (Measured: 1.2 to 3x the time of memcpy
    // at a good offset, against 6 to 12x for memcpy at this one.)
    std::size_t at = bytes;
    while (at >= 64) {
        at -= 64;
        unsigned char block[64];
        std::memcpy(block, src + at, 64);
        std::memcpy(dst + at, block, 64);
    }
    std::memcpy(dst, src, at);
}

namespace {

// What a normalising gather applies to each row: C means and scales.
struct Normalizer {
    const float* mean;
    const float* scale;
    std::size_t channels;
};

// The loops below that compute on every value (dtype conversion,
// standardisation) are compiled twice with GCC on x86-64: for the baseline
// the package targets and for AVX2, picked at load time by the CPU it runs
// on (target_clones: an ifunc). Same operations, in the same order, so the
// results are bit for bit the same; AVX2 only does 8 at a time instead of 4.
// Not in sanitizer builds: the ifunc resolver runs while the program is
// relocated, before the sanitizer's runtime is up, and its instrumented
// code crashes there (ThreadSanitizer: SIGSEGV in the resolver).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__) && \
    !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
#define FINEGYM_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FINEGYM_SIMD_CLONES
#endif

FINEGYM_SIMD_CLONES void widen_rows(const unsigned char* src, unsigned char* dst, std::size_t elements) {
    for (std::size_t e = 0; e < elements; ++e) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * e, 2);
        const float f = half_to_float(h);
        std::memcpy(dst + 4 * e, &f, 4);
    }
}

FINEGYM_SIMD_CLONES void narrow_rows(const unsigned char* src, unsigned char* dst, std::size_t elements) {
    for (std::size_t e = 0; e < elements; ++e) {
        float f;
        std::memcpy(&f, src + 4 * e, 4);
        const std::uint16_t h = float_to_half(f);
        std::memcpy(dst + 2 * e, &h, 2);
    }
}

// One row layout per (stored, output) dtype pair, so the channel loop has
// no branch on the dtype.
template <DType From, DType To>
FINEGYM_SIMD_CLONES void normalize_rows(const unsigned char* src, unsigned char* dst, std::size_t rows, const Normalizer& norm) {
    constexpr std::size_t in = From == DType::Float16 ? 2 : 4;
    constexpr std::size_t out = To == DType::Float16 ? 2 : 4;
    const std::size_t channels = norm.channels;
    const float* const mean = norm.mean;
    const float* const scale = norm.scale;
    for (std::size_t r = 0; r < rows; ++r) {
        const unsigned char* s = src + r * channels * in;
        unsigned char* d = dst + r * channels * out;
        for (std::size_t c = 0; c < channels; ++c) {
            float x;
            if constexpr (From == DType::Float16) {
                std::uint16_t h;
                std::memcpy(&h, s + 2 * c, 2);
                x = half_to_float(h);
            } else {
                std::memcpy(&x, s + 4 * c, 4);
            }
            const float y = (x - mean[c]) * scale[c];
            if constexpr (To == DType::Float16) {
                const std::uint16_t h = float_to_half(y);
                std::memcpy(d + 2 * c, &h, 2);
            } else {
                std::memcpy(d + 4 * c, &y, 4);
            }
        }
    }
}

// Copies `elements` values (whole rows) from `src` to `dst`, converting the
// dtype; with a normalizer, also standardises each value in the same pass:
// (x - mean[c]) * scale[c], in float32, then rounded to the output dtype.
void convert_rows(const unsigned char* src, DType from, unsigned char* dst, DType to, std::size_t elements,
                  const Normalizer* norm) {
    if (norm != nullptr) {
        const std::size_t rows = elements / norm->channels;
        if (from == DType::Float16) {
            if (to == DType::Float16) normalize_rows<DType::Float16, DType::Float16>(src, dst, rows, *norm);
            else normalize_rows<DType::Float16, DType::Float32>(src, dst, rows, *norm);
        } else {
            if (to == DType::Float16) normalize_rows<DType::Float32, DType::Float16>(src, dst, rows, *norm);
            else normalize_rows<DType::Float32, DType::Float32>(src, dst, rows, *norm);
        }
    } else if (from == to) {
        copy_row(dst, src, elements * dtype_size(from));
    } else if (from == DType::Float16) {
        widen_rows(src, dst, elements);
    } else {
        narrow_rows(src, dst, elements);
    }
}

std::uintptr_t page_size() {
    static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    return page;
}

void advise_willneed(const unsigned char* begin, std::size_t bytes) {
    const std::uintptr_t page = page_size();
    const auto first = reinterpret_cast<std::uintptr_t>(begin) & ~(page - 1);
    const auto last = reinterpret_cast<std::uintptr_t>(begin) + bytes;
    // Advice only: an error changes nothing about correctness, so it is ignored.
    ::madvise(reinterpret_cast<void*>(first), last - first, MADV_WILLNEED);
}

// Page residency of [begin, begin + bytes) into `vec` (one byte per page,
// bit 0 set when resident; see mincore(2)); returns the first page's address.
// On failure (which mincore only reports for a bad range) every page is
// marked missing, so the caller errs towards prefetching.
std::uintptr_t residency(const unsigned char* begin, std::size_t bytes, std::vector<unsigned char>& vec) {
    const std::uintptr_t page = page_size();
    const auto first = reinterpret_cast<std::uintptr_t>(begin) & ~(page - 1);
    const auto last = reinterpret_cast<std::uintptr_t>(begin) + bytes;
    const std::size_t pages = static_cast<std::size_t>((last - first + page - 1) / page);
    vec.resize(pages);
    if (::mincore(reinterpret_cast<void*>(first), last - first, vec.data()) != 0) std::fill(vec.begin(), vec.end(), 0);
    return first;
}

// True when some page of [begin, begin + bytes) is not resident, according
// to `vec` (from residency(), covering the range, first page at `first`).
bool missing(const unsigned char* begin, std::size_t bytes, std::uintptr_t first, const std::vector<unsigned char>& vec) {
    const std::uintptr_t page = page_size();
    const auto lo = static_cast<std::size_t>((reinterpret_cast<std::uintptr_t>(begin) - first) / page);
    const auto hi = static_cast<std::size_t>((reinterpret_cast<std::uintptr_t>(begin) + bytes - 1 - first) / page);
    for (std::size_t p = lo; p <= hi; ++p)
        if ((vec[p] & 1u) == 0) return true;
    return false;
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

void check_normalizable(const StoreReader& reader, const FeatureColumn& col) {
    if (!col.has_stats)
        throw std::invalid_argument("normalize=True needs the per-channel statistics of column '" + col.name +
                                    "', which '" + reader.path() + "' (format version " +
                                    std::to_string(reader.header().version) +
                                    ") does not hold: `finegym-store stats " + reader.path() +
                                    " --output NEW.fgs` writes a copy that does");
    for (std::size_t c = 0; c < col.mean.size(); ++c)
        if (!std::isfinite(col.mean[c]) || !std::isfinite(col.std_dev[c]))
            throw std::invalid_argument("normalize=True cannot standardise column '" + col.name + "' of '" +
                                        reader.path() + "': channel " + std::to_string(c) + " has mean " +
                                        std::to_string(col.mean[c]) + " and standard deviation " +
                                        std::to_string(col.std_dev[c]) + " (the column holds NaN or Inf values)");
}

void check_indices(const std::int64_t* indices, std::size_t batch, std::uint64_t num_instances) {
    const auto n = static_cast<std::int64_t>(num_instances);
    for (std::size_t b = 0; b < batch; ++b)
        if (indices[b] < -n || indices[b] >= n)
            throw std::out_of_range("index " + std::to_string(indices[b]) + " (position " + std::to_string(b) +
                                    ") is out of range for a store of " + std::to_string(n) + " instances");
}

std::size_t output_row_stride(const FeatureColumn& col, const GatherSpec& spec, std::size_t out_row_stride) {
    const std::size_t packed = col.channels * dtype_size(output_dtype(col, spec));
    if (out_row_stride == 0) return packed;
    if (out_row_stride < packed)
        throw std::invalid_argument("output row stride of " + std::to_string(out_row_stride) +
                                    " bytes is below a row of column '" + col.name + "' (" +
                                    std::to_string(packed) + " bytes)");
    return out_row_stride;
}

void gather(const StoreReader& reader, const FeatureColumn& col, const std::int64_t* indices, std::size_t batch,
            const GatherSpec& spec, const GatherOptions& options, void* out, ThreadPool& pool,
            std::size_t out_row_stride) {
    validate(spec);
    if (spec.normalize) check_normalizable(reader, col);
    const DType out_dtype = output_dtype(col, spec);
    const std::uint64_t rows_out = output_rows(col, spec);
    output_bytes(batch, rows_out, col.channels, dtype_size(out_dtype));  // the caller's `out` has this size
    const std::size_t out_stride = output_row_stride(col, spec, out_row_stride);
    output_bytes(batch, rows_out, out_stride, 1);  // and spans this many bytes
    const auto n = static_cast<std::int64_t>(reader.num_instances());
    check_indices(indices, batch, reader.num_instances());
    std::vector<Rows> sources(batch);
    for (std::size_t b = 0; b < batch; ++b) sources[b] = reader.instance(col, indices[b]);
    if (batch == 0) return;
    const Normalizer norm_values{col.mean.data(), col.scale.data(), static_cast<std::size_t>(col.channels)};
    const Normalizer* norm = spec.normalize ? &norm_values : nullptr;
    const std::size_t in_row = col.channels * dtype_size(col.dtype);
    const std::size_t out_row = col.channels * dtype_size(out_dtype);
    auto* dst = static_cast<unsigned char*>(out);
    const unsigned threads = options.threads;

    // The segments of instance b, into `s` (rows_out entries).
    auto choose = [&](std::size_t b, std::uint64_t* s) {
        if (spec.num_segments == 0) {
            for (std::uint64_t r = 0; r < rows_out; ++r) s[r] = r;
            return;
        }
        std::int64_t i = indices[b];
        if (i < 0) i += n;
        sample_segments(sources[b].rows, spec.num_segments, spec.clip_len, *spec.mode,
                        SampleKey{spec.seed, options.epoch, static_cast<std::uint64_t>(i)}, s, spec.rule);
    };
    // Every instance's segments, chosen once (by whichever pass reaches the
    // instance first; a parallel_for's end orders its writes before the next
    // pass): 8 bytes per output row (a float32 row of C channels takes 4 * C).
    std::vector<std::uint64_t> segs(batch * static_cast<std::size_t>(rows_out));
    std::vector<unsigned char> chosen(batch, 0);
    auto segments_of = [&](std::size_t b) {
        std::uint64_t* s = segs.data() + b * rows_out;
        if (chosen[b] == 0) {
            choose(b, s);
            chosen[b] = 1;
        }
        return s;
    };
    thread_local std::vector<unsigned char> resident;  // per-thread mincore vector, reused across batches

    // Whether instance b has a page of the rows it reads missing from the page
    // cache (mincore); with `advise`, also madvise(WILLNEED)s exactly the runs
    // of rows with a missing page. One mincore over the span of rows the
    // instance reads (lowest to highest segment), or one per run for a few
    // rows of a long instance (not mapping residency over rows it skips).
    auto check = [&](std::size_t b, bool advise) {
        const std::uint64_t* s = segments_of(b);
        const unsigned char* src = sources[b].data;
        std::uint64_t lo = s[0], hi = s[0];
        for (std::uint64_t r = 1; r < rows_out; ++r) {
            lo = std::min(lo, s[r]);
            hi = std::max(hi, s[r]);
        }
        const std::size_t span_bytes = static_cast<std::size_t>(hi - lo + 1) * in_row;
        const bool per_run = span_bytes / 4 > static_cast<std::size_t>(rows_out) * in_row + 16 * page_size();
        std::uintptr_t first = per_run ? 0 : residency(src + lo * in_row, span_bytes, resident);
        bool any = false;
        for_each_run(s, rows_out, [&](std::uint64_t r, std::uint64_t run) {
            if (any && !advise) return;
            const unsigned char* at = src + s[r] * in_row;
            const std::size_t bytes = static_cast<std::size_t>(run) * in_row;
            if (per_run) first = residency(at, bytes, resident);
            if (missing(at, bytes, first, resident)) {
                any = true;
                if (advise) advise_willneed(at, bytes);
            }
        });
        return any;
    };

    // Pass 1: queue the disk reads of the rows the batch needs, all at once
    // (madvise WILLNEED starts the reads and returns), so a cold file is read
    // at a deep queue depth instead of one page fault at a time in pass 2.
    //   On:   every run of rows is advised.
    //   Off:  nothing is (no pass 1).
    //   Auto: decided for this batch from the rows it reads, with no state
    //         kept between batches (so no other thread's faults or earlier
    //         batch can switch it off). First a probe, on this thread, of
    //         kProbe instances scattered over the batch: all resident -> the
    //         batch is taken as hot and pass 1 is skipped (a hot batch pays
    //         kProbe mincore calls, not one per instance). Otherwise every
    //         instance is checked in parallel and only the runs with a
    //         missing page are advised: a cold batch queues all its rows, a
    //         partly resident one exactly its missing runs.
    constexpr std::size_t kProbe = 8;
    bool advise_all = options.readahead == Readahead::On;
    bool check_all = false;
    if (options.readahead == Readahead::Auto) {
        const std::size_t probes = std::min(batch, kProbe);
        // Positions scattered by a multiplicative hash, not evenly spaced: an
        // even spacing aliases with patterns such as "every other instance
        // resident" and would see only resident ones.
        for (std::size_t j = 0; j < probes && !check_all; ++j) {
            const std::uint64_t h = ((static_cast<std::uint64_t>(j) + 1) * 0x9E3779B97F4A7C15ull) >> 32;
            check_all = check(static_cast<std::size_t>((h * batch) >> 32), false);  // high bits: < batch
        }
    }
    if (advise_all || check_all) {
        pool.parallel_for(batch, [&](std::size_t b) {
            if (check_all) {
                check(b, true);
                return;
            }
            const std::uint64_t* s = segments_of(b);
            for_each_run(s, rows_out, [&](std::uint64_t r, std::uint64_t run) {
                advise_willneed(sources[b].data + s[r] * in_row, static_cast<std::size_t>(run) * in_row);
            });
        }, threads);
    }

    // Pass 2: copy (and convert) runs of consecutive segments, one call each
    // (row by row into a strided output).
    // A file truncated under the mapping raises SIGBUS in the copy: the guard
    // (fault_guard.hpp) abandons that instance and the batch raises IoError.
    ensure_sigbus_handler();
    std::atomic<bool> faulted{false};
    pool.parallel_for(batch, [&](std::size_t b) {
        if (faulted.load(std::memory_order_relaxed)) return;
        const std::uint64_t* s = segments_of(b);
        const unsigned char* src = sources[b].data;
        unsigned char* row_out = dst + b * rows_out * out_stride;
        // Guarded: pointer arithmetic, prefetches and convert_rows() into the
        // caller's buffer; no allocation, lock or destructor (fault_guard.hpp).
        if (!guard_sigbus([&] {
            // Touch the first line of every page of every row up front: the
            // address translations (TLB misses, costly under virtualisation) and
            // first cache misses of all rows then overlap instead of queueing
            // behind each copy.
            for (std::uint64_t r = 0; r < rows_out; ++r)
                for (std::size_t off = 0; off < in_row; off += 4096) __builtin_prefetch(src + s[r] * in_row + off);
            if (out_stride == out_row) {
                for_each_run(s, rows_out, [&](std::uint64_t r, std::uint64_t run) {
                    convert_rows(src + s[r] * in_row, col.dtype, row_out + r * out_row, out_dtype,
                                 static_cast<std::size_t>(run) * col.channels, norm);
                });
            } else {
                // Strided output rows (a column slice of a wider array): one row at a time.
                for (std::uint64_t r = 0; r < rows_out; ++r)
                    convert_rows(src + s[r] * in_row, col.dtype, row_out + r * out_stride, out_dtype,
                                 col.channels, norm);
            }
        }))
            faulted.store(true, std::memory_order_relaxed);
    }, threads);
    if (faulted.load()) throw_mapping_fault(reader.path(), "gather");
}

}  // namespace finegym
