#include "finegym/format.hpp"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <system_error>

#include "finegym/errors.hpp"
#include "finegym/hash.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "finegym-store maps little-endian files directly and supports little-endian hosts only"
#endif

namespace finegym {

void throw_io_error(const std::string& call, const std::string& path) {
    const int err = errno;
    throw IoError(call + " failed for '" + path + "': " + std::generic_category().message(err), err, path);
}

namespace {

template <typename T>
void put(unsigned char* dst, std::size_t at, T value) {
    std::memcpy(dst + at, &value, sizeof(T));
}

template <typename T>
T get(const unsigned char* src, std::size_t at) {
    T value;
    std::memcpy(&value, src + at, sizeof(T));
    return value;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
    throw FormatError("'" + path + "' is not a valid finegym-store file: " + what);
}

// a * b, or false on overflow.
bool mul_ok(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
    if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
    out = a * b;
    return true;
}

}  // namespace

// ---- dtypes ----------------------------------------------------------------------
bool dtype_valid(std::uint8_t code) noexcept { return code >= 1 && code <= 5; }

std::size_t dtype_size(DType t) {
    switch (t) {
        case DType::UInt8: return 1;
        case DType::Int32: return 4;
        case DType::Int64: return 8;
        case DType::Float16: return 2;
        case DType::Float32: return 4;
    }
    throw std::invalid_argument("unknown dtype code " + std::to_string(static_cast<int>(t)));
}

const char* dtype_name(DType t) {
    switch (t) {
        case DType::UInt8: return "uint8";
        case DType::Int32: return "int32";
        case DType::Int64: return "int64";
        case DType::Float16: return "float16";
        case DType::Float32: return "float32";
    }
    throw std::invalid_argument("unknown dtype code " + std::to_string(static_cast<int>(t)));
}

DType dtype_from_name(std::string_view name) {
    for (std::uint8_t c = 1; c <= 5; ++c) {
        auto t = static_cast<DType>(c);
        if (name == dtype_name(t)) return t;
    }
    throw std::invalid_argument("unsupported dtype '" + std::string(name) +
                                "'; expected one of uint8, int32, int64, float16, float32");
}

// ---- header ------------------------------------------------------------------------
std::array<unsigned char, kHeaderSize> encode_header(const Header& h) {
    std::array<unsigned char, kHeaderSize> b{};
    std::memcpy(b.data() + hdr::magic, kMagic.data(), kMagic.size());
    put<std::uint32_t>(b.data(), hdr::version, h.version);
    put<std::uint32_t>(b.data(), hdr::header_size, kHeaderSize);
    put<std::uint64_t>(b.data(), hdr::file_size, h.file_size);
    put<std::uint64_t>(b.data(), hdr::num_instances, h.num_instances);
    put<std::uint64_t>(b.data(), hdr::table_offset, h.table_offset);
    put<std::uint32_t>(b.data(), hdr::num_sections, h.num_sections);
    put<std::uint32_t>(b.data(), hdr::entry_size, kSectionEntrySize);
    put<std::uint64_t>(b.data(), hdr::flags, h.flags);
    put<std::uint64_t>(b.data(), hdr::checksum, h.checksum);
    return b;
}

Header decode_header(const unsigned char* b, std::uint64_t actual_size, const std::string& path) {
    if (std::memcmp(b + hdr::magic, kMagic.data(), kMagic.size()) != 0)
        fail(path, "bad magic (the first 8 bytes are not \"FGSTORE\\0\"); is this a finegym-store file?");
    Header h;
    h.version = get<std::uint32_t>(b, hdr::version);
    if (h.version < kMinFormatVersion || h.version > kFormatVersion)
        fail(path, "format version " + std::to_string(h.version) + " is not supported; this build reads versions " +
                       std::to_string(kMinFormatVersion) + " to " + std::to_string(kFormatVersion) +
                       " (upgrade finegym-store, or re-convert)");
    const auto header_size = get<std::uint32_t>(b, hdr::header_size);
    if (header_size != kHeaderSize)
        fail(path, "header_size is " + std::to_string(header_size) + ", expected " + std::to_string(kHeaderSize));
    const auto entry_size = get<std::uint32_t>(b, hdr::entry_size);
    if (entry_size != kSectionEntrySize)
        fail(path, "section_entry_size is " + std::to_string(entry_size) + ", expected " +
                       std::to_string(kSectionEntrySize));
    h.file_size = get<std::uint64_t>(b, hdr::file_size);
    if (h.file_size != actual_size)
        fail(path, "the header records a file of " + std::to_string(h.file_size) + " bytes but the file has " +
                       std::to_string(actual_size) + " (truncated or appended to)");
    h.num_instances = get<std::uint64_t>(b, hdr::num_instances);
    h.table_offset = get<std::uint64_t>(b, hdr::table_offset);
    h.num_sections = get<std::uint32_t>(b, hdr::num_sections);
    h.flags = get<std::uint64_t>(b, hdr::flags);
    h.checksum = get<std::uint64_t>(b, hdr::checksum);
    if (h.flags != 0) {
        char hex[19];
        std::snprintf(hex, sizeof hex, "0x%llx", static_cast<unsigned long long>(h.flags));
        fail(path, std::string("unknown flags ") + hex + " (written by a newer finegym-store?)");
    }
    if (h.num_sections == 0 || h.num_sections > kMaxSections)
        fail(path, "section_count " + std::to_string(h.num_sections) + " is outside 1.." + std::to_string(kMaxSections));
    if (h.table_offset < kHeaderSize || h.table_offset % kSectionAlign != 0)
        fail(path, "section_table_offset " + std::to_string(h.table_offset) + " is not a multiple of " +
                       std::to_string(kSectionAlign) + " past the header");
    const std::uint64_t table_size = std::uint64_t{h.num_sections} * kSectionEntrySize;
    if (h.table_offset > h.file_size || table_size > h.file_size - h.table_offset)
        fail(path, "the section table (" + std::to_string(h.num_sections) + " entries at offset " +
                       std::to_string(h.table_offset) + ") runs past the end of the file");
    if (table_size != h.file_size - h.table_offset)
        fail(path, "the section table (" + std::to_string(h.num_sections) + " entries at offset " +
                       std::to_string(h.table_offset) + ") ends at " + std::to_string(h.table_offset + table_size) +
                       ", but the file goes on to " + std::to_string(h.file_size) +
                       "; the table must end the file (no bytes after it)");
    // The number of instances is bounded by what int64 offsets can index.
    if (h.num_instances > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max() / 8))
        fail(path, "instance_count " + std::to_string(h.num_instances) + " is implausibly large");
    return h;
}

std::uint64_t header_checksum(const unsigned char* header, const unsigned char* table, std::size_t table_size) {
    Hasher64 h;
    h.update(header, hdr::checksum);
    h.update(table, table_size);
    return h.digest();
}

// ---- section entries ------------------------------------------------------------
std::array<unsigned char, kSectionEntrySize> encode_section(const Section& s) {
    if (s.name.empty() || s.name.size() >= kSectionNameSize)
        throw std::invalid_argument("section name '" + s.name + "' must be 1.." +
                                    std::to_string(kSectionNameSize - 1) + " bytes");
    if (s.shape.empty() || s.shape.size() > kMaxDims)
        throw std::invalid_argument("section '" + s.name + "' must have 1.." + std::to_string(kMaxDims) + " dims");
    std::array<unsigned char, kSectionEntrySize> b{};
    std::memcpy(b.data() + entry::name, s.name.data(), s.name.size());
    put<std::uint64_t>(b.data(), entry::offset, s.offset);
    put<std::uint64_t>(b.data(), entry::length, s.length);
    put<std::uint64_t>(b.data(), entry::checksum, s.checksum);
    b[entry::dtype] = static_cast<unsigned char>(s.dtype);
    b[entry::ndim] = static_cast<unsigned char>(s.shape.size());
    for (std::size_t i = 0; i < s.shape.size(); ++i) put<std::uint64_t>(b.data(), entry::shape + 8 * i, s.shape[i]);
    return b;
}

static bool valid_section_char(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
           c == '/' || c == '.';
}

Section decode_section(const unsigned char* b, std::uint32_t index, const Header& h, const std::string& path) {
    // Messages are built only on failure: open stays cheap for 65,536 entries.
    const auto where = [index] { return "section entry " + std::to_string(index); };
    const auto* name_begin = b + entry::name;
    const void* nul = std::memchr(name_begin, 0, kSectionNameSize);
    if (nul == nullptr) fail(path, where() + ": name is not NUL-terminated within 64 bytes");
    const auto name_len = static_cast<std::size_t>(static_cast<const unsigned char*>(nul) - name_begin);
    if (name_len == 0) fail(path, where() + ": empty name");
    Section s;
    s.name.assign(reinterpret_cast<const char*>(name_begin), name_len);
    for (char ch : s.name) {
        const auto c = static_cast<unsigned char>(ch);
        if (!valid_section_char(c)) fail(path, where() + ": name contains byte " + std::to_string(c) + ", expected [A-Za-z0-9_./-]");
    }
    for (std::size_t i = name_len; i < kSectionNameSize; ++i)
        if (name_begin[i] != 0) fail(path, where() + " ('" + s.name + "'): name padding is not zero");
    const auto named = [&s] { return "section '" + s.name + "'"; };
    s.offset = get<std::uint64_t>(b, entry::offset);
    s.length = get<std::uint64_t>(b, entry::length);
    s.checksum = get<std::uint64_t>(b, entry::checksum);
    const std::uint8_t code = b[entry::dtype];
    if (!dtype_valid(code)) fail(path, named() + ": unknown dtype code " + std::to_string(code) + ", expected 1..5");
    s.dtype = static_cast<DType>(code);
    const std::uint8_t ndim = b[entry::ndim];
    if (ndim < 1 || ndim > kMaxDims) fail(path, named() + ": ndim " + std::to_string(ndim) + " is outside 1..4");
    for (std::size_t i = entry::reserved; i < entry::shape; ++i)
        if (b[i] != 0) fail(path, named() + ": reserved bytes are not zero");
    std::uint64_t count = 1;
    for (std::size_t i = 0; i < kMaxDims; ++i) {
        const auto d = get<std::uint64_t>(b, entry::shape + 8 * i);
        if (i < ndim) {
            s.shape.push_back(d);
            if (!mul_ok(count, d, count)) fail(path, named() + ": shape overflows");
        } else if (d != 0) {
            fail(path, named() + ": shape dim " + std::to_string(i) + " is set but ndim is " + std::to_string(ndim));
        }
    }
    std::uint64_t bytes = 0;
    if (!mul_ok(count, dtype_size(s.dtype), bytes) || bytes != s.length)
        fail(path, named() + ": length " + std::to_string(s.length) + " does not match its shape and dtype");
    if (s.offset % kSectionAlign != 0)
        fail(path, named() + ": offset " + std::to_string(s.offset) + " is not a multiple of " + std::to_string(kSectionAlign));
    if (s.offset < kHeaderSize || s.offset > h.table_offset || s.length > h.table_offset - s.offset)
        fail(path, named() + ": bytes [" + std::to_string(s.offset) + ", +" + std::to_string(s.length) +
                       ") lie outside the data area [64, " + std::to_string(h.table_offset) + ")");
    return s;
}

namespace schema {
bool valid_column_name(std::string_view name) noexcept {
    if (name.empty() || name.size() > kMaxColumnName) return false;
    // "features/offsets" would read as the offsets of a column called "features":
    // the last parts of the schema's suffixes are reserved.
    for (auto reserved : kReservedColumnNames)
        if (name == reserved) return false;
    for (char ch : name) {
        const auto c = static_cast<unsigned char>(ch);
        const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
        if (!ok) return false;
    }
    return true;
}
}  // namespace schema

}  // namespace finegym
