// Batch gathering: copy the sampled segments of B instances of one feature
// column into a (B, K * L, C) output, in parallel on the thread pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "finegym/reader.hpp"
#include "finegym/sampler.hpp"
#include "finegym/thread_pool.hpp"

namespace finegym {

// When to madvise(WILLNEED) the rows of a batch before copying them.
enum class Readahead : std::uint8_t {
    Auto = 0,  // per batch: the runs of rows with a page missing from the page cache (mincore; see gather.cpp)
    On = 1,
    Off = 2,
};

// What a batch is made of: which segments each instance contributes and in
// which dtype. A value built once (finegym_store.SegmentSpec) and checked
// once by validate(); everything that changes per call (the epoch) or only
// affects speed (threads, read-ahead) is a GatherOptions.
struct GatherSpec {
    std::uint64_t num_segments = 0;   // K; 0 = every segment (fixed-T columns only)
    std::uint64_t clip_len = 1;       // L
    std::optional<SampleMode> mode;   // required when num_segments > 0
    Sampling rule = Sampling::MMAction2;
    std::optional<DType> out_dtype;   // float32 or float16; empty = the column's dtype
    std::uint64_t seed = 0;
    // Standardise every value with its channel's statistics (format version
    // 3): (x - mean) * scale in float32, in the same pass as the copy.
    bool normalize = false;
};

// Per call: the epoch (train-mode segments are keyed by it) and execution.
struct GatherOptions {
    std::uint64_t epoch = 0;
    unsigned threads = 0;  // 0 = every core
    Readahead readahead = Readahead::Auto;
};

// Throws std::invalid_argument, naming the field, for a spec no column can
// serve: clip_len 0, num_segments without a mode, K * L above
// kMaxSampleCount, clip_len > 1 without num_segments, an output dtype other
// than float32/float16.
void validate(const GatherSpec& spec);

// Rows per instance in the output: K * L, or T when num_segments is 0.
// Throws std::invalid_argument for a spec that does not fit the column
// (or fails validate()).
std::uint64_t output_rows(const FeatureColumn& col, const GatherSpec& spec);

// The output's element type: spec.out_dtype, or the column's.
DType output_dtype(const FeatureColumn& col, const GatherSpec& spec) noexcept;

// Bytes of a (batch, rows, channels) output of `itemsize`-byte elements.
// Throws std::invalid_argument, naming the sizes, when the product overflows
// or exceeds this machine's physical memory (so it could never be allocated).
std::size_t output_bytes(std::uint64_t batch, std::uint64_t rows, std::uint64_t channels, std::size_t itemsize);

// Throws std::invalid_argument, naming the column and the file, when a
// normalising gather cannot use `col`: it has no statistics (a store of
// format version 1 or 2), or a channel's mean or standard deviation is NaN
// or infinite.
void check_normalizable(const StoreReader& reader, const FeatureColumn& col);

// Throws std::out_of_range naming the first index outside [-n, n) and its position.
void check_indices(const std::int64_t* indices, std::size_t batch, std::uint64_t num_instances);

// Fills `out` (B x output_rows x C elements of output_dtype). Rows are
// `out_row_stride` bytes apart (0: C * itemsize, C-contiguous) and
// instances output_rows * out_row_stride bytes apart, each row's C
// elements contiguous: a stride above C * itemsize writes a column slice
// out[:, :, off:off + C] of a wider C-contiguous array (one copy per row
// instead of one per run of consecutive segments). std::invalid_argument
// for a stride below C * itemsize. Every index is checked before anything
// is copied: std::out_of_range names the first bad one and its position.
// Negative indices count from the end. With spec.normalize, each value x
// of channel c becomes (x - col.mean[c]) * col.scale[c], computed in float32.
void gather(const StoreReader& reader, const FeatureColumn& col, const std::int64_t* indices, std::size_t batch,
            const GatherSpec& spec, const GatherOptions& options, void* out, ThreadPool& pool,
            std::size_t out_row_stride = 0);

// The row stride gather() uses for `out_row_stride` (0: C * itemsize of the
// output dtype); std::invalid_argument, naming both, when it is below that.
std::size_t output_row_stride(const FeatureColumn& col, const GatherSpec& spec, std::size_t out_row_stride);

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
