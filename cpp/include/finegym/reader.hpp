// Opening a store: map the file, validate header, section table, schema and
// layout, and hand out pointers into the mapping.
//
// What opening reads: the header and section table (copied into the reader),
// the zero padding between sections (< 4096 bytes per section), and every
// int64 offsets array (8 bytes per instance per string or ragged column, plus
// 8 per class) and every column's statistics (8 bytes per channel), which it
// copies into reader-owned memory and validates there.
// It never touches feature or string bytes, so its cost does not depend on
// how much feature data the file holds.
//
// A store changed on disk while open: every later access uses the copies made
// at open (sizes, offsets), never re-reads them from the mapping, so it stays
// inside the mapping; copies and hashes of mapped bytes are guarded against
// SIGBUS (fault_guard.hpp) and raise IoError naming the file instead.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "finegym/format.hpp"
#include "finegym/mapped_file.hpp"
#include "finegym/schema.hpp"

namespace finegym {

struct Rows {
    const unsigned char* data;  // first byte of row 0 of the instance
    std::uint64_t rows;         // T_i
};

class StoreReader {
public:
    explicit StoreReader(const std::string& path);

    const std::string& path() const noexcept { return file_.path(); }
    std::uint64_t file_size() const noexcept { return file_.size(); }
    const Header& header() const noexcept { return header_; }
    std::uint64_t num_instances() const noexcept { return header_.num_instances; }
    const Schema& schema() const noexcept { return schema_; }
    const std::vector<Section>& sections() const noexcept { return sections_; }

    const Section& section(std::string_view name) const;  // throws NotFound
    const Section* find(std::string_view name) const noexcept;  // nullptr when absent
    const unsigned char* bytes(const Section& s) const noexcept { return file_.data() + s.offset; }

    // The int64 offsets section `s` (ids/offsets, features/COL/offsets, ...)
    // as validated at open: a reader-owned copy, immune to later changes of
    // the file. Throws NotFound if `s` is not an offsets section.
    const std::vector<std::int64_t>& offsets(const Section& s) const;

    const FeatureColumn& column(std::string_view name) const;  // throws NotFound listing the columns
    // Rows of instance i in `col`; throws std::out_of_range naming i and the count.
    Rows instance(const FeatureColumn& col, std::int64_t i) const;

    // Throws IoError (EIO) naming the file if it is now shorter than when it
    // was mapped: call before handing out a view into the mapping.
    void check_not_truncated(const char* during) const { file_.check_not_truncated(during); }

    // Copies bytes [begin, end) of section `s` into `dst`; guarded against
    // SIGBUS (IoError). std::out_of_range if the range is not inside `s`.
    void copy_bytes(const Section& s, std::uint64_t begin, std::uint64_t end, void* dst) const;

    // Names of sections whose bytes do not match their checksum (empty:
    // intact). When ids/offsets and ids/data are intact, also checks that
    // ids are unique: FormatError naming the file and the repeated id.
    // IoError if the file was truncated or its header/table rewritten since open.
    std::vector<std::string> verify() const;

private:
    void load_offsets(const Section& s, std::uint64_t limit, bool strictly_increasing);
    void load_stats(FeatureColumn& col);
    void check_layout();
    void check_unique_ids() const;

    MappedFile file_;
    Header header_;
    std::vector<unsigned char> header_bytes_;  // header and table as read (and checksummed) at open
    std::vector<unsigned char> table_bytes_;
    std::vector<Section> sections_;
    SectionIndex index_;
    Schema schema_;
    std::unordered_map<std::size_t, std::vector<std::int64_t>> offsets_;  // section index -> validated copy
};

}  // namespace finegym
