// The finegym-store file layout, defined once for the writer and the reader.
// docs/FORMAT.md describes the same layout in prose, byte by byte; keep the
// two in step and bump kFormatVersion whenever the bytes change.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace finegym {

// ---- file header: 64 bytes at offset 0, all integers little-endian -------
inline constexpr std::array<char, 8> kMagic = {'F', 'G', 'S', 'T', 'O', 'R', 'E', '\0'};
inline constexpr std::uint32_t kFormatVersion = 3;     // what the writer writes
inline constexpr std::uint32_t kMinFormatVersion = 1;  // the oldest version the reader opens
inline constexpr std::uint32_t kHeaderSize = 64;
inline constexpr std::uint32_t kSectionEntrySize = 128;
inline constexpr std::size_t kSectionNameSize = 64;  // NUL-padded; at most 63 bytes used
inline constexpr std::uint32_t kMaxSections = 65536;
inline constexpr std::uint32_t kMaxDims = 4;
// Every section starts at a multiple of kSectionAlign; feature sections at a
// multiple of kFeatureAlign (a page), so an instance is a plain strided view.
inline constexpr std::uint64_t kSectionAlign = 64;
inline constexpr std::uint64_t kFeatureAlign = 4096;
// Version 2: every feature section features/COL has a block-checksum section
// features/COL/blocks, int64 (ceil(length / kBlockSize),): the XXH64 of each
// kBlockSize-byte block of features/COL (the last one short), its uint64 bits
// stored as int64. A reader of part of a column (a remote store's cache)
// checks the blocks it holds without reading the rest.
inline constexpr std::uint64_t kBlockSize = std::uint64_t{1} << 20;
// Version 3: every feature column COL also has features/COL/stats, float32
// (2, C): row 0 the mean, row 1 the standard deviation (population: divided
// by the row count) of each channel over every stored row of the column,
// accumulated in float64 by the writer from the values as stored.
inline constexpr std::uint32_t kStatsVersion = 3;

struct Header {
    std::uint32_t version = kFormatVersion;
    std::uint64_t file_size = 0;
    std::uint64_t num_instances = 0;
    std::uint64_t table_offset = 0;
    std::uint32_t num_sections = 0;
    std::uint64_t flags = 0;
    std::uint64_t checksum = 0;  // XXH64 of header bytes [0, 56) then the section table
};

// Header field byte offsets (docs/FORMAT.md, "File header").
namespace hdr {
inline constexpr std::size_t magic = 0;
inline constexpr std::size_t version = 8;
inline constexpr std::size_t header_size = 12;
inline constexpr std::size_t file_size = 16;
inline constexpr std::size_t num_instances = 24;
inline constexpr std::size_t table_offset = 32;
inline constexpr std::size_t num_sections = 40;
inline constexpr std::size_t entry_size = 44;
inline constexpr std::size_t flags = 48;
inline constexpr std::size_t checksum = 56;
}  // namespace hdr

// ---- element types ----------------------------------------------------------
enum class DType : std::uint8_t {
    UInt8 = 1,
    Int32 = 2,
    Int64 = 3,
    Float16 = 4,
    Float32 = 5,
};

std::size_t dtype_size(DType t);          // throws std::invalid_argument on unknown codes
const char* dtype_name(DType t);          // "uint8", "int32", ... (numpy spelling)
DType dtype_from_name(std::string_view name);  // inverse of dtype_name
bool dtype_valid(std::uint8_t code) noexcept;

// ---- section table entry: 128 bytes ---------------------------------------------
struct Section {
    std::string name;
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    std::uint64_t checksum = 0;  // XXH64 of the section's bytes
    DType dtype = DType::UInt8;
    std::vector<std::uint64_t> shape;  // 1..kMaxDims dims; product * itemsize == length
};

namespace entry {
inline constexpr std::size_t name = 0;
inline constexpr std::size_t offset = 64;
inline constexpr std::size_t length = 72;
inline constexpr std::size_t checksum = 80;
inline constexpr std::size_t dtype = 88;
inline constexpr std::size_t ndim = 89;
inline constexpr std::size_t reserved = 90;  // 6 zero bytes
inline constexpr std::size_t shape = 96;     // 4 x u64, unused dims 0
}  // namespace entry

// Serialise / parse the fixed-size parts. Parsing validates every field and
// throws FormatError with `path` and the field in the message.
std::array<unsigned char, kHeaderSize> encode_header(const Header& h);
Header decode_header(const unsigned char* bytes, std::uint64_t actual_file_size, const std::string& path);
std::array<unsigned char, kSectionEntrySize> encode_section(const Section& s);
Section decode_section(const unsigned char* bytes, std::uint32_t index, const Header& h, const std::string& path);
std::uint64_t header_checksum(const unsigned char* header, const unsigned char* table, std::size_t table_size);

// ---- schema: the section names a store is made of ----------------------------------
// Every store has N instances and these sections:
//   ids/offsets  int64 (N+1)   ids/data uint8 (bytes)   -- Arrow large_utf8 layout
//   labels       int32 (N)     -1 where unlabelled
//   meta/video/offsets int64 (N+1), meta/video/data uint8   -- "" where the id did not parse
//   meta/event_start, meta/event_end, meta/element_start, meta/element_end  int32 (N), -1 where unparsed
// and per feature column NAME:
//   features/NAME          float32|float16, (N, T, C) when every instance has T rows,
//                          or (S, C) with S = total rows when T varies (ragged), plus
//   features/NAME/offsets  int64 (N+1), ragged columns only: rows of instance i are
//                          [offsets[i], offsets[i+1]); strictly increasing (T_i > 0)
//   features/NAME/blocks   int64 (ceil(bytes / kBlockSize),), version >= 2 (and
//                          required there): XXH64 of each block of features/NAME
//   features/NAME/stats    float32 (2, C), version >= 3 (and required there):
//                          per-channel mean (row 0) and standard deviation (row 1)
// At least one feature column. Ids are unique (checked by verify, not open).
// Optional, present together when a categories file was given (M classes):
//   classes/label int32 (M), classes/glabel int32 (M), classes/set int32 (M),
//   classes/name/offsets int64 (M+1) + classes/name/data uint8,
//   classes/event/offsets int64 (M+1) + classes/event/data uint8
// Optional: attrs  uint8, a UTF-8 JSON object of provenance (free form).
namespace schema {
inline constexpr std::string_view kIds = "ids";
inline constexpr std::string_view kLabels = "labels";
inline constexpr std::string_view kMetaVideo = "meta/video";
inline constexpr std::array<std::string_view, 4> kMetaInts = {
    "meta/event_start", "meta/event_end", "meta/element_start", "meta/element_end"};
inline constexpr std::string_view kFeaturePrefix = "features/";
inline constexpr std::string_view kOffsetsSuffix = "/offsets";
inline constexpr std::string_view kDataSuffix = "/data";
inline constexpr std::string_view kBlocksSuffix = "/blocks";
inline constexpr std::string_view kStatsSuffix = "/stats";
inline constexpr std::string_view kClassPrefix = "classes/";
inline constexpr std::array<std::string_view, 3> kClassInts = {
    "classes/label", "classes/glabel", "classes/set"};
inline constexpr std::array<std::string_view, 2> kClassStrings = {"classes/name", "classes/event"};
inline constexpr std::string_view kAttrs = "attrs";
inline constexpr std::size_t kMaxColumnName = 40;
// Column names that would collide with the suffixes above: "features/offsets"
// reads as the offsets of a ragged column. ("features/data" is unambiguous, and
// version-1 writers accepted it, so "data" stays a valid name.)
inline constexpr std::array<std::string_view, 1> kReservedColumnNames = {"offsets"};

// A column name is 1..40 characters of [A-Za-z0-9_-], and not one of
// kReservedColumnNames.
bool valid_column_name(std::string_view name) noexcept;
}  // namespace schema

}  // namespace finegym
