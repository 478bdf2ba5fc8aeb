// What a store is made of, on top of the raw section table: which sections
// must exist, their dtypes and shapes, and the feature columns they form.
// The writer validates the table it is about to commit with the same function
// the reader uses to open a file, so both agree on the layout by construction.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "finegym/format.hpp"

namespace finegym {

struct FeatureColumn {
    std::string name;
    DType dtype = DType::Float32;
    std::uint64_t segments = 0;  // T for fixed columns, 0 when ragged
    std::uint64_t channels = 0;  // C
    std::size_t values = 0;      // index of the features/NAME section
    std::size_t offsets = 0;     // index of features/NAME/offsets (ragged only)
    bool has_blocks = false;     // version 2: features/NAME/blocks exists
    std::size_t blocks = 0;      // its index
    bool has_stats = false;      // version 3: features/NAME/stats exists
    std::size_t stats = 0;       // its index
    // Its content, loaded and checked by the reader at open (C values each):
    // the mean, the standard deviation, and the scale a normalising gather
    // multiplies by (1 / std, or 1 where std is 0).
    std::vector<float> mean, std_dev, scale;
    // Ragged columns whose instances all have one T: that T (the reader sets
    // it from the offsets, for messages); 0 otherwise.
    std::uint64_t common_segments = 0;
    bool ragged() const noexcept { return segments == 0; }
};

struct Schema {
    std::uint64_t num_instances = 0;
    std::uint64_t num_classes = 0;  // 0 when the store has no label hierarchy
    bool has_classes = false;
    bool has_attrs = false;
    std::vector<FeatureColumn> columns;  // in section-table order
};

// Section name -> index in the table. The views point into the Sections'
// names: the vector must outlive the index and not reallocate.
using SectionIndex = std::unordered_map<std::string_view, std::size_t>;

// Builds the index; throws FormatError naming `path` for a duplicate name.
SectionIndex index_sections(const std::vector<Section>& sections, const std::string& path);

// Checks names, dtypes, shapes and alignment of every section against the
// schema in format.hpp, in O(sections). Throws FormatError naming `path` and
// the section.
// `version` decides what each feature column carries besides its values:
// block checksums from version 2 on, statistics from version 3 on.
Schema validate_schema(const std::vector<Section>& sections, const SectionIndex& index,
                       std::uint64_t num_instances, const std::string& path, std::uint32_t version);
Schema validate_schema(const std::vector<Section>& sections, std::uint64_t num_instances, const std::string& path,
                       std::uint32_t version);

// Index of the section called `name`, or -1 (a linear scan; readers use their index).
std::ptrdiff_t find_section(const std::vector<Section>& sections, std::string_view name);

}  // namespace finegym
