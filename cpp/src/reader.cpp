#include "finegym/reader.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

#include "finegym/errors.hpp"
#include "finegym/fault_guard.hpp"
#include "finegym/hash.hpp"

namespace finegym {
namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
    throw FormatError("'" + path + "' is not a valid finegym-store file: " + what);
}

std::uint64_t align_up(std::uint64_t v, std::uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace

StoreReader::StoreReader(const std::string& path) : file_(path, kHeaderSize) {
    // Header and table are copied out of the mapping (guarded: the file may
    // shrink under us) and parsed from the copies, so nothing later re-reads them.
    header_bytes_.resize(kHeaderSize);
    copy_mapped(header_bytes_.data(), file_.data(), kHeaderSize, path, "open");
    header_ = decode_header(header_bytes_.data(), file_.size(), path);
    const std::size_t table_size = std::size_t{header_.num_sections} * kSectionEntrySize;
    table_bytes_.resize(table_size);
    copy_mapped(table_bytes_.data(), file_.data() + header_.table_offset, table_size, path, "open");
    if (header_checksum(header_bytes_.data(), table_bytes_.data(), table_size) != header_.checksum)
        fail(path, "header checksum mismatch (the header or section table is damaged)");
    sections_.reserve(header_.num_sections);
    for (std::uint32_t i = 0; i < header_.num_sections; ++i)
        sections_.push_back(decode_section(table_bytes_.data() + std::size_t{i} * kSectionEntrySize, i, header_, path));
    index_ = index_sections(sections_, path);  // views into sections_, which no longer changes
    schema_ = validate_schema(sections_, index_, header_.num_instances, path, header_.version);
    check_layout();

    // Offsets are data, not header: copy them once, here, prove the copies in
    // bounds, and use only the copies afterwards.
    auto strings = [&](std::string_view base) {
        const Section& data = section(std::string(base) + std::string(schema::kDataSuffix));
        load_offsets(section(std::string(base) + std::string(schema::kOffsetsSuffix)), data.length, false);
    };
    strings(schema::kIds);
    strings(schema::kMetaVideo);
    if (schema_.has_classes)
        for (auto name : schema::kClassStrings) strings(name);
    for (auto& col : schema_.columns) {
        if (!col.ragged()) continue;
        load_offsets(sections_[col.offsets], sections_[col.values].shape[0], true);
        const auto& off = offsets_.at(col.offsets);
        bool common = off.size() > 1;
        for (std::size_t i = 1; common && i + 1 < off.size(); ++i) common = off[i + 1] - off[i] == off[1] - off[0];
        col.common_segments = common ? static_cast<std::uint64_t>(off[1] - off[0]) : 0;
    }
    for (auto& col : schema_.columns)
        if (col.has_stats) load_stats(col);
}

// The statistics are read at every normalising gather, so they are copied
// here and checked in full (their checksum too: a flipped bit would skew
// every normalised batch without failing anything else).
void StoreReader::load_stats(FeatureColumn& col) {
    const Section& s = sections_[col.stats];
    const auto c = static_cast<std::size_t>(col.channels);
    std::vector<float> values(2 * c);
    copy_mapped(values.data(), bytes(s), static_cast<std::size_t>(s.length), path(), "open");
    if (hash64(values.data(), static_cast<std::size_t>(s.length)) != s.checksum)
        fail(path(), "section '" + s.name + "' does not match its checksum (damaged statistics)");
    col.mean.assign(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(c));
    col.std_dev.assign(values.begin() + static_cast<std::ptrdiff_t>(c), values.end());
    col.scale.resize(c);
    for (std::size_t k = 0; k < c; ++k) {
        const float sd = col.std_dev[k];
        if (sd < 0)
            fail(path(), "section '" + s.name + "' gives channel " + std::to_string(k) +
                             " a negative standard deviation (" + std::to_string(sd) + ")");
        col.scale[k] = sd > 0 ? 1.0f / sd : 1.0f;
    }
}

// Sections sorted by offset must not overlap, and what lies between them (and
// between the last one and the table) is the writer's alignment padding: fewer
// bytes than the next section's alignment, all zero. Those bytes are not
// covered by any checksum, so they are checked here; at most 4095 bytes per
// section are read.
void StoreReader::check_layout() {
    std::vector<std::uint64_t> align(sections_.size(), kSectionAlign);
    for (const auto& col : schema_.columns) align[col.values] = kFeatureAlign;
    std::vector<std::size_t> order(sections_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        const Section& x = sections_[a];
        const Section& y = sections_[b];
        // Ties (empty sections sharing an offset): the more aligned one first.
        if (x.offset != y.offset) return x.offset < y.offset;
        if (x.length != y.length) return x.length < y.length;
        return align[a] > align[b];
    });
    std::vector<unsigned char> gap;
    std::uint64_t end = kHeaderSize;
    const Section* prev = nullptr;  // names for messages, built only on failure
    auto name_of = [](const Section* s) { return s == nullptr ? std::string("the section table") : "section '" + s->name + "'"; };
    auto before = [&] { return prev == nullptr ? std::string("the header") : name_of(prev); };
    auto check_gap = [&](std::uint64_t next, std::uint64_t alignment, const Section* s) {
        if (next < end)
            fail(path(), name_of(s) + " at offset " + std::to_string(next) + " overlaps " + before() +
                             " (which ends at " + std::to_string(end) + ")");
        if (next != align_up(end, alignment))
            fail(path(), "there are " + std::to_string(next - end) + " bytes between " + before() + " (ends at " +
                             std::to_string(end) + ") and " + name_of(s) + " (at " + std::to_string(next) +
                             "); only padding to the next multiple of " + std::to_string(alignment) +
                             " may lie between sections");
        if (next == end) return;
        gap.resize(static_cast<std::size_t>(next - end));
        copy_mapped(gap.data(), file_.data() + end, gap.size(), path(), "open");
        for (std::size_t k = 0; k < gap.size(); ++k)
            if (gap[k] != 0)
                fail(path(), "padding byte at offset " + std::to_string(end + k) + " (between " + before() + " and " +
                                 name_of(s) + ") is " + std::to_string(gap[k]) + ", expected 0");
    };
    for (std::size_t i : order) {
        const Section& s = sections_[i];
        check_gap(s.offset, align[i], &s);
        end = s.offset + s.length;
        prev = &s;
    }
    check_gap(header_.table_offset, kSectionAlign, nullptr);
}

void StoreReader::load_offsets(const Section& s, std::uint64_t limit, bool strictly_increasing) {
    const std::uint64_t n = s.shape[0];
    std::vector<std::int64_t> v(static_cast<std::size_t>(n));
    copy_mapped(v.data(), bytes(s), static_cast<std::size_t>(s.length), path(), "open");
    for (std::size_t i = 0; i < v.size(); ++i) {
        const bool bad = (i == 0) ? v[i] != 0 : (v[i] < v[i - 1]);
        if (bad || static_cast<std::uint64_t>(v[i]) > limit)
            fail(path(), "section '" + s.name + "' entry " + std::to_string(i) + " is " + std::to_string(v[i]) +
                             "; offsets must start at 0, never decrease, and stay within " + std::to_string(limit));
        if (strictly_increasing && i > 0 && v[i] == v[i - 1])
            fail(path(), "section '" + s.name + "' entry " + std::to_string(i) + " equals entry " +
                             std::to_string(i - 1) + " (" + std::to_string(v[i]) + "): instance " +
                             std::to_string(i - 1) + " has no rows; every instance needs T > 0");
    }
    if (!v.empty() && static_cast<std::uint64_t>(v.back()) != limit)
        fail(path(), "section '" + s.name + "' ends at " + std::to_string(v.back()) + ", expected " +
                         std::to_string(limit));
    offsets_[static_cast<std::size_t>(&s - sections_.data())] = std::move(v);
}

const Section* StoreReader::find(std::string_view name) const noexcept {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &sections_[it->second];
}

const Section& StoreReader::section(std::string_view name) const {
    const Section* s = find(name);
    if (s == nullptr) throw NotFound("'" + path() + "' has no section '" + std::string(name) + "'");
    return *s;
}

const std::vector<std::int64_t>& StoreReader::offsets(const Section& s) const {
    const auto it = offsets_.find(static_cast<std::size_t>(&s - sections_.data()));
    if (it == offsets_.end()) throw NotFound("section '" + s.name + "' of '" + path() + "' is not an offsets array");
    return it->second;
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
    const auto idx = static_cast<std::size_t>(i);
    const Section& values = sections_[col.values];
    const std::uint64_t row_bytes = col.channels * dtype_size(col.dtype);
    if (!col.ragged()) return {bytes(values) + idx * col.segments * row_bytes, col.segments};
    // The validated copy, never the mapping: a file rewritten in place cannot move rows out of bounds.
    const auto& off = offsets_.at(col.offsets);
    return {bytes(values) + static_cast<std::uint64_t>(off[idx]) * row_bytes,
            static_cast<std::uint64_t>(off[idx + 1] - off[idx])};
}

void StoreReader::copy_bytes(const Section& s, std::uint64_t begin, std::uint64_t end, void* dst) const {
    if (begin > end || end > s.length)
        throw std::out_of_range("bytes [" + std::to_string(begin) + ", " + std::to_string(end) + ") are not inside section '" +
                                s.name + "' of '" + path() + "' (" + std::to_string(s.length) + " bytes)");
    copy_mapped(dst, bytes(s) + begin, static_cast<std::size_t>(end - begin), path(), "a read of '" + s.name + "'");
}

void StoreReader::check_unique_ids() const {
    const Section& data = section(std::string(schema::kIds) + std::string(schema::kDataSuffix));
    const auto& off = offsets(section(std::string(schema::kIds) + std::string(schema::kOffsetsSuffix)));
    std::string text(static_cast<std::size_t>(data.length), '\0');
    copy_bytes(data, 0, data.length, text.data());
    std::unordered_map<std::string_view, std::size_t> seen;
    seen.reserve(off.size());
    for (std::size_t i = 0; i + 1 < off.size(); ++i) {
        const std::string_view id(text.data() + off[i], static_cast<std::size_t>(off[i + 1] - off[i]));
        const auto [it, inserted] = seen.emplace(id, i);
        if (!inserted)
            fail(path(), "id '" + std::string(id) + "' appears twice (instances " + std::to_string(it->second) +
                             " and " + std::to_string(i) + "); ids must be unique");
    }
}

std::vector<std::string> StoreReader::verify() const {
    // The header and table on disk must still be the ones validated at open.
    file_.check_not_truncated("verify");
    std::vector<unsigned char> now(header_bytes_.size());
    copy_mapped(now.data(), file_.data(), now.size(), path(), "verify");
    std::vector<unsigned char> table(table_bytes_.size());
    copy_mapped(table.data(), file_.data() + header_.table_offset, table.size(), path(), "verify");
    if (now != header_bytes_ || table != table_bytes_)
        throw IoError("'" + path() + "' changed on disk since it was opened (its header or section table differs); "
                      "reopen it", ESTALE, path());
    std::vector<std::string> damaged;
    for (const auto& s : sections_)
        if (hash_mapped(bytes(s), static_cast<std::size_t>(s.length), path(), "verify of section '" + s.name + "'") !=
            s.checksum)
            damaged.push_back(s.name);
    const bool ids_intact = std::none_of(damaged.begin(), damaged.end(), [](const std::string& n) {
        return n.compare(0, schema::kIds.size() + 1, std::string(schema::kIds) + "/") == 0;
    });
    if (ids_intact) check_unique_ids();
    return damaged;
}

}  // namespace finegym
