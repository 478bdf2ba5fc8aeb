#include "finegym/reader.hpp"

#include <cstring>
#include <stdexcept>

#include "finegym/errors.hpp"
#include "finegym/hash.hpp"

namespace finegym {

StoreReader::StoreReader(const std::string& path) : file_(path, kHeaderSize) {
    const unsigned char* base = file_.data();
    header_ = decode_header(base, file_.size(), path);
    const unsigned char* table = base + header_.table_offset;
    const std::size_t table_size = std::size_t{header_.num_sections} * kSectionEntrySize;
    if (header_checksum(base, table, table_size) != header_.checksum)
        throw FormatError("'" + path + "' is not a valid finegym-store file: header checksum mismatch "
                          "(the header or section table is damaged)");
    sections_.reserve(header_.num_sections);
    for (std::uint32_t i = 0; i < header_.num_sections; ++i)
        sections_.push_back(decode_section(table + std::size_t{i} * kSectionEntrySize, i, header_, path));
    schema_ = validate_schema(sections_, header_.num_instances, path);

    // Offsets are data, not header: prove them in bounds once, here, so that
    // every later access can trust them.
    check_offsets("ids/offsets", section("ids/data").length);
    check_offsets("meta/video/offsets", section("meta/video/data").length);
    if (schema_.has_classes) {
        for (auto name : schema::kClassStrings)
            check_offsets(std::string(name) + "/offsets", section(std::string(name) + "/data").length);
    }
    for (const auto& col : schema_.columns)
        if (col.ragged()) check_offsets(sections_[col.offsets].name, sections_[col.values].shape[0]);
}

void StoreReader::check_offsets(std::string_view offsets_name, std::uint64_t limit) const {
    const Section& s = section(offsets_name);
    const unsigned char* p = bytes(s);
    const std::uint64_t n = s.shape[0];
    std::int64_t prev = 0;
    for (std::uint64_t i = 0; i < n; ++i) {
        std::int64_t v;
        std::memcpy(&v, p + 8 * i, 8);
        const bool bad = (i == 0) ? v != 0 : (v < prev);
        if (bad || static_cast<std::uint64_t>(v) > limit)
            throw FormatError("'" + path() + "' is not a valid finegym-store file: section '" + s.name +
                              "' entry " + std::to_string(i) + " is " + std::to_string(v) +
                              "; offsets must start at 0, never decrease, and stay within " + std::to_string(limit));
        prev = v;
    }
    if (n > 0 && static_cast<std::uint64_t>(prev) != limit)
        throw FormatError("'" + path() + "' is not a valid finegym-store file: section '" + s.name +
                          "' ends at " + std::to_string(prev) + ", expected " + std::to_string(limit));
}

const Section& StoreReader::section(std::string_view name) const {
    const auto i = find_section(sections_, name);
    if (i < 0) throw NotFound("'" + path() + "' has no section '" + std::string(name) + "'");
    return sections_[static_cast<std::size_t>(i)];
}

const FeatureColumn& StoreReader::column(std::string_view name) const {
    for (const auto& c : schema_.columns)
        if (c.name == name) return c;
    std::string known;
    for (const auto& c : schema_.columns) known += (known.empty() ? "" : ", ") + c.name;
    throw NotFound("no feature column '" + std::string(name) + "' in '" + path() + "'; columns: " + known);
}

Rows StoreReader::instance(const FeatureColumn& col, std::int64_t i) const {
    const auto n = static_cast<std::int64_t>(header_.num_instances);
    if (i < -n || i >= n)
        throw std::out_of_range("instance index " + std::to_string(i) + " is out of range for a store of " +
                                std::to_string(n) + " instances");
    if (i < 0) i += n;
    const auto idx = static_cast<std::uint64_t>(i);
    const Section& values = sections_[col.values];
    const std::uint64_t row_bytes = col.channels * dtype_size(col.dtype);
    if (!col.ragged()) return {bytes(values) + idx * col.segments * row_bytes, col.segments};
    const unsigned char* off = bytes(sections_[col.offsets]);
    std::int64_t begin, end;
    std::memcpy(&begin, off + 8 * idx, 8);
    std::memcpy(&end, off + 8 * (idx + 1), 8);
    return {bytes(values) + static_cast<std::uint64_t>(begin) * row_bytes, static_cast<std::uint64_t>(end - begin)};
}

std::vector<std::string> StoreReader::verify() const {
    std::vector<std::string> damaged;
    for (const auto& s : sections_)
        if (hash64(bytes(s), static_cast<std::size_t>(s.length)) != s.checksum) damaged.push_back(s.name);
    return damaged;
}

}  // namespace finegym
