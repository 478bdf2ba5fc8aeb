// Writing a store, atomically. Bytes go to an unnamed temporary file in the
// target's folder (O_TMPFILE; a hidden named file where the filesystem lacks
// it); commit() writes the section table and header, fsyncs, and only then
// gives the file its name. A writer destroyed without commit() - an exception,
// a Python KeyboardInterrupt - removes everything it wrote; a killed process
// leaves no file under the target name (and, with O_TMPFILE, no file at all).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "finegym/format.hpp"
#include "finegym/hash.hpp"
#include "finegym/stats.hpp"

namespace finegym {

class StoreWriter {
public:
    StoreWriter(std::string path, std::uint64_t num_instances, bool overwrite);
    ~StoreWriter();
    StoreWriter(const StoreWriter&) = delete;
    StoreWriter& operator=(const StoreWriter&) = delete;
    StoreWriter(StoreWriter&&) = delete;
    StoreWriter& operator=(StoreWriter&&) = delete;

    // A whole section in one call (labels, meta, class arrays, attrs).
    void add_section(std::string name, DType dtype, std::vector<std::uint64_t> shape, const void* data,
                     std::size_t size);
    // An Arrow large_utf8 pair NAME/offsets + NAME/data from UTF-8 strings.
    void add_strings(std::string_view name, const std::vector<std::string>& values);

    // Feature columns are streamed: begin, append whole rows in instance
    // order, end. `segments` is T for a fixed column, 0 for a ragged one
    // (whose end() takes the row count of every instance). Appending hashes
    // the rows (section and block checksums) and adds them to the column's
    // per-channel statistics; end() writes those sections.
    void begin_features(const std::string& column, DType dtype, std::uint64_t segments, std::uint64_t channels);
    void append_features(const void* data, std::size_t size);
    void end_features(const std::vector<std::int64_t>& row_counts);
    // Statistics for the open feature column given, not computed: its end()
    // writes these 2 x C float32 values (C means, then C standard
    // deviations; finite, deviations >= 0) instead of the rows' own.
    void set_feature_stats(const std::vector<float>& mean_then_std);

    // Validates the schema, writes table and header, fsyncs, names the file.
    void commit();
    // Drops everything written (also what the destructor does without commit).
    void discard() noexcept;

    const std::string& path() const noexcept { return path_; }
    std::uint64_t bytes_written() const noexcept { return pos_; }

private:
    void write_all(const void* data, std::size_t size);
    void kick_writeback();
    void pad_to(std::uint64_t alignment);
    void start_section(std::string name, DType dtype, std::uint64_t alignment);
    void finish_section(std::vector<std::uint64_t> shape);
    void check_open() const;
    void hash_blocks(const unsigned char* data, std::size_t size);

    std::string path_;
    std::string dir_;
    std::string temp_name_;  // named fallback only; empty with O_TMPFILE
    int fd_ = -1;
    bool overwrite_ = false;
    std::uint64_t num_instances_ = 0;
    std::uint64_t pos_ = 0;
    std::uint64_t synced_ = 0;  // bytes handed to writeback so far
    std::vector<Section> sections_;

    // The section being streamed.
    bool in_section_ = false;
    Section current_;
    Hasher64 hasher_;
    std::uint64_t current_bytes_ = 0;
    // The feature column being streamed.
    bool in_features_ = false;
    std::uint64_t feat_segments_ = 0;
    std::uint64_t feat_channels_ = 0;
    std::string feat_column_;
    // Block checksums of the feature column being streamed (kBlockSize blocks).
    Hasher64 block_hasher_;
    std::uint64_t block_fill_ = 0;
    std::vector<std::int64_t> block_sums_;
    // Per-channel statistics of the feature column being streamed.
    ChannelStats stats_;
    std::vector<float> stats_given_;  // set_feature_stats(); empty: the rows' own
};

}  // namespace finegym
