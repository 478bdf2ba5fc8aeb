// Opening a store: map the file, validate header, section table and schema,
// and hand out pointers into the mapping. Opening reads the header, the table
// and the int64 offset arrays (to prove every string and ragged row lies in
// bounds); it never touches feature bytes, so it costs the same for any file size.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
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
    const unsigned char* bytes(const Section& s) const noexcept { return file_.data() + s.offset; }

    const FeatureColumn& column(std::string_view name) const;  // throws NotFound listing the columns
    // Rows of instance i in `col`; throws std::out_of_range naming i and the count.
    Rows instance(const FeatureColumn& col, std::int64_t i) const;

    // Names of sections whose bytes do not match their checksum (empty: intact).
    std::vector<std::string> verify() const;

    // Access-pattern state, not file content: whether the last gather needed
    // disk reads, so the next one should queue its reads up front (gather.cpp).
    mutable std::atomic<bool> cold_hint{true};

private:
    void check_offsets(std::string_view offsets_name, std::uint64_t limit) const;

    MappedFile file_;
    Header header_;
    std::vector<Section> sections_;
    Schema schema_;
};

}  // namespace finegym
