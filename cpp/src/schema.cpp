#include "finegym/schema.hpp"

#include <unordered_map>

#include "finegym/errors.hpp"

namespace finegym {
namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
    throw FormatError("'" + path + "' is not a valid finegym-store file: " + what);
}

bool starts_with(std::string_view s, std::string_view prefix) {
    return s.size() >= prefix.size() && s.substr(0, prefix.size()) == prefix;
}
bool ends_with(std::string_view s, std::string_view suffix) {
    return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::string shape_str(const std::vector<std::uint64_t>& shape) {
    std::string out = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        if (i) out += ", ";
        out += std::to_string(shape[i]);
    }
    return out + (shape.size() == 1 ? ",)" : ")");
}

class Checker {
public:
    Checker(const std::vector<Section>& sections, const SectionIndex& index, const std::string& path)
        : sections_(sections), index_(index), path_(path), used_(sections.size(), false) {}

    std::ptrdiff_t find(std::string_view name) const {
        const auto it = index_.find(name);
        return it == index_.end() ? -1 : static_cast<std::ptrdiff_t>(it->second);
    }

    const Section& require(std::string_view name) {
        const auto i = find(name);
        if (i < 0) fail(path_, "required section '" + std::string(name) + "' is missing");
        used_[static_cast<std::size_t>(i)] = true;
        return sections_[static_cast<std::size_t>(i)];
    }

    // A 1-D array of `dtype` with `n` elements.
    void vector(std::string_view name, DType dtype, std::uint64_t n) {
        const Section& s = require(name);
        if (s.dtype != dtype || s.shape.size() != 1 || s.shape[0] != n)
            fail(path_, "section '" + s.name + "' is " + dtype_name(s.dtype) + shape_str(s.shape) + ", expected " +
                            dtype_name(dtype) + "(" + std::to_string(n) + ",)");
    }

    // An Arrow large_utf8 pair: NAME/offsets int64 (n+1) and NAME/data uint8 (bytes).
    void strings(std::string_view base, std::uint64_t n) {
        vector(std::string(base) + std::string(schema::kOffsetsSuffix), DType::Int64, n + 1);
        const Section& d = require(std::string(base) + std::string(schema::kDataSuffix));
        if (d.dtype != DType::UInt8 || d.shape.size() != 1)
            fail(path_, "section '" + d.name + "' is " + dtype_name(d.dtype) + shape_str(d.shape) +
                            ", expected a 1-D uint8 array");
    }

    void mark(std::size_t i) { used_[i] = true; }

    void no_leftovers() const {
        for (std::size_t i = 0; i < sections_.size(); ++i)
            if (!used_[i]) fail(path_, "unexpected section '" + sections_[i].name + "'");
    }

private:
    const std::vector<Section>& sections_;
    const SectionIndex& index_;
    const std::string& path_;
    std::vector<bool> used_;
};

}  // namespace

std::ptrdiff_t find_section(const std::vector<Section>& sections, std::string_view name) {
    for (std::size_t i = 0; i < sections.size(); ++i)
        if (sections[i].name == name) return static_cast<std::ptrdiff_t>(i);
    return -1;
}

SectionIndex index_sections(const std::vector<Section>& sections, const std::string& path) {
    SectionIndex index;
    index.reserve(sections.size());
    for (std::size_t i = 0; i < sections.size(); ++i)
        if (!index.emplace(sections[i].name, i).second) fail(path, "section '" + sections[i].name + "' appears twice");
    return index;
}

Schema validate_schema(const std::vector<Section>& sections, std::uint64_t n, const std::string& path,
                       std::uint32_t version) {
    return validate_schema(sections, index_sections(sections, path), n, path, version);
}

// O(sections): every lookup goes through the hash index.
Schema validate_schema(const std::vector<Section>& sections, const SectionIndex& index, std::uint64_t n,
                       const std::string& path, std::uint32_t version) {
    Schema out;
    out.num_instances = n;
    Checker c(sections, index, path);
    c.strings(schema::kIds, n);
    c.vector(schema::kLabels, DType::Int32, n);
    c.strings(schema::kMetaVideo, n);
    for (auto name : schema::kMetaInts) c.vector(name, DType::Int32, n);

    // Label hierarchy: all of it or none of it.
    const auto cls = c.find(schema::kClassInts[0]);
    if (cls >= 0) {
        const Section& s = sections[static_cast<std::size_t>(cls)];
        if (s.shape.size() != 1) fail(path, "section '" + s.name + "' must be 1-D");
        out.has_classes = true;
        out.num_classes = s.shape[0];
        for (auto name : schema::kClassInts) c.vector(name, DType::Int32, out.num_classes);
        for (auto name : schema::kClassStrings) c.strings(name, out.num_classes);
    }
    const auto attrs = c.find(schema::kAttrs);
    if (attrs >= 0) {
        const Section& s = sections[static_cast<std::size_t>(attrs)];
        if (s.dtype != DType::UInt8 || s.shape.size() != 1) fail(path, "section 'attrs' must be 1-D uint8");
        out.has_attrs = true;
        c.mark(static_cast<std::size_t>(attrs));
    }

    for (std::size_t i = 0; i < sections.size(); ++i) {
        const Section& s = sections[i];
        if (!starts_with(s.name, schema::kFeaturePrefix) || ends_with(s.name, schema::kOffsetsSuffix)) continue;
        // features/COL/blocks (version 2) and features/COL/stats (version 3)
        // belong to column COL; "features/blocks" (no second slash) is a
        // column named "blocks".
        const bool nested = s.name.find('/', schema::kFeaturePrefix.size()) != std::string::npos;
        if (nested && ((version >= 2 && ends_with(s.name, schema::kBlocksSuffix)) ||
                       (version >= kStatsVersion && ends_with(s.name, schema::kStatsSuffix))))
            continue;
        FeatureColumn col;
        col.name = s.name.substr(schema::kFeaturePrefix.size());
        if (!schema::valid_column_name(col.name))
            fail(path, "section '" + s.name + "': column name must be 1..40 characters of [A-Za-z0-9_-], "
                           "and not 'offsets'");
        if (s.dtype != DType::Float32 && s.dtype != DType::Float16)
            fail(path, "section '" + s.name + "' is " + dtype_name(s.dtype) + ", expected float32 or float16");
        if (s.offset % kFeatureAlign != 0)
            fail(path, "section '" + s.name + "' starts at " + std::to_string(s.offset) + ", not a multiple of 4096");
        col.dtype = s.dtype;
        col.values = i;
        c.mark(i);
        const std::string offsets_name = s.name + std::string(schema::kOffsetsSuffix);
        const auto off = c.find(offsets_name);
        if (s.shape.size() == 3) {
            if (s.shape[0] != n || s.shape[1] == 0 || s.shape[2] == 0)
                fail(path, "section '" + s.name + "' has shape " + shape_str(s.shape) + ", expected (" +
                               std::to_string(n) + ", T > 0, C > 0)");
            if (off >= 0) fail(path, "section '" + offsets_name + "' belongs to no ragged column");
            col.segments = s.shape[1];
            col.channels = s.shape[2];
        } else if (s.shape.size() == 2) {
            if (s.shape[1] == 0) fail(path, "section '" + s.name + "' has C = 0 channels");
            c.vector(offsets_name, DType::Int64, n + 1);
            col.offsets = static_cast<std::size_t>(off);
            col.channels = s.shape[1];
        } else {
            fail(path, "section '" + s.name + "' has " + std::to_string(s.shape.size()) +
                           " dims, expected 3 (N, T, C) or 2 (rows, C) for a ragged column");
        }
        if (version >= 2) {
            const std::uint64_t nblocks = (s.length + kBlockSize - 1) / kBlockSize;
            const std::string blocks_name = s.name + std::string(schema::kBlocksSuffix);
            c.vector(blocks_name, DType::Int64, nblocks);
            col.has_blocks = true;
            col.blocks = static_cast<std::size_t>(c.find(blocks_name));
        }
        if (version >= kStatsVersion) {
            const std::string stats_name = s.name + std::string(schema::kStatsSuffix);
            const Section& st = c.require(stats_name);
            if (st.dtype != DType::Float32 || st.shape.size() != 2 || st.shape[0] != 2 || st.shape[1] != col.channels)
                fail(path, "section '" + stats_name + "' is " + dtype_name(st.dtype) + shape_str(st.shape) +
                               ", expected float32(2, " + std::to_string(col.channels) + ")");
            col.has_stats = true;
            col.stats = static_cast<std::size_t>(c.find(stats_name));
        }
        out.columns.push_back(col);
    }
    c.no_leftovers();
    if (out.columns.empty())
        fail(path, "no feature column (no 'features/NAME' section); a store needs at least one");
    return out;
}

}  // namespace finegym
