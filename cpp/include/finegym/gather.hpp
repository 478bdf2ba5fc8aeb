// Batch gathering: copy the sampled segments of B instances of one feature
// column into a (B, K * L, C) output, in parallel on the thread pool.
#pragma once

#include <cstddef>
#include <cstdint>

#include "finegym/reader.hpp"
#include "finegym/sampler.hpp"
#include "finegym/thread_pool.hpp"

namespace finegym {

// When to madvise(WILLNEED) the rows of a batch before copying them.
enum class Prefetch : std::uint8_t {
    Auto = 0,  // per batch: the runs of rows with a page missing from the page cache (mincore; see gather.cpp)
    On = 1,
    Off = 2,
};

struct GatherSpec {
    std::uint64_t num_segments = 0;  // K; 0 = every segment (fixed-T columns only)
    std::uint64_t clip_len = 1;      // L
    SampleMode mode = SampleMode::Test;
    Sampling sampling = Sampling::MMAction2;
    std::uint64_t seed = 0;
    std::uint64_t epoch = 0;
    DType out_dtype = DType::Float32;  // float32 or float16
    unsigned threads = 0;              // 0 = every core
    Prefetch prefetch = Prefetch::Auto;
};

// Rows per instance in the output: K * L, or T when num_segments is 0.
// Throws std::invalid_argument for a spec that does not fit the column
// (including K * L above kMaxSampleCount).
std::uint64_t output_rows(const FeatureColumn& col, const GatherSpec& spec);

// Bytes of a (batch, rows, channels) output of `itemsize`-byte elements.
// Throws std::invalid_argument, naming the sizes, when the product overflows
// or exceeds this machine's physical memory (so it could never be allocated).
std::size_t output_bytes(std::uint64_t batch, std::uint64_t rows, std::uint64_t channels, std::size_t itemsize);

// Throws std::out_of_range naming the first index outside [-n, n) and its position.
void check_indices(const std::int64_t* indices, std::size_t batch, std::uint64_t num_instances);

// Fills `out` (B x output_rows x C elements of spec.out_dtype, C-contiguous).
// Every index is checked before anything is copied: std::out_of_range names
// the first bad one and its position. Negative indices count from the end.
void gather(const StoreReader& reader, const FeatureColumn& col, const std::int64_t* indices, std::size_t batch,
            const GatherSpec& spec, void* out, ThreadPool& pool);

// Copies `bytes` from src to dst (not overlapping). Same as memcpy, except
// when dst lies 1 to 31 bytes past src modulo 4096: there x86 `rep movsb`
// (glibc's memcpy for rows of a few KiB on CPUs with fast short rep movsb)
// stalls on false store-to-load dependencies, 6 to 12x slower than at other
// offsets on our AMD EPYC VM, so such rows are copied in 64-byte blocks
// from the end instead. (Outputs that gather allocates are page-aligned, as
// features sections are, so rows of a multiple of 4 KiB never hit this;
// malloc puts large numpy arrays 16 bytes into a page, which does.)
void copy_row(unsigned char* dst, const unsigned char* src, std::size_t bytes) noexcept;

// Portable IEEE half <-> single conversions (round to nearest even).
float half_to_float(std::uint16_t h) noexcept;
std::uint16_t float_to_half(float f) noexcept;

}  // namespace finegym
