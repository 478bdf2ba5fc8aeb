#include "finegym/writer.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>

#include "finegym/errors.hpp"
#include "finegym/schema.hpp"

namespace finegym {
namespace {

std::string dirname_of(const std::string& path) {
    const auto slash = path.find_last_of('/');
    if (slash == std::string::npos) return ".";
    if (slash == 0) return "/";
    return path.substr(0, slash);
}

std::string basename_of(const std::string& path) {
    const auto slash = path.find_last_of('/');
    return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool exists(const std::string& path) {
    struct stat st {};
    return ::lstat(path.c_str(), &st) == 0;
}

std::string random_suffix() {
    std::random_device rd;
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    std::string s;
    for (int i = 0; i < 10; ++i) s += alphabet[rd() % (sizeof(alphabet) - 1)];
    return s;
}

void fsync_dir(const std::string& dir) {
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;  // best effort: some filesystems refuse to open folders
    ::fsync(fd);
    ::close(fd);
}

}  // namespace

StoreWriter::StoreWriter(std::string path, std::uint64_t num_instances, bool overwrite)
    : path_(std::move(path)), dir_(dirname_of(path_)), overwrite_(overwrite), num_instances_(num_instances) {
    if (basename_of(path_).empty()) throw std::invalid_argument("output path '" + path_ + "' names a folder, not a file");
    if (!overwrite_ && exists(path_)) {
        errno = EEXIST;
        throw_io_error("create (pass overwrite=True to replace it)", path_);
    }
#ifdef O_TMPFILE
    fd_ = ::open(dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
#endif
    if (fd_ < 0) {
        // No O_TMPFILE here: fall back to a hidden name in the same folder.
        for (int attempt = 0; attempt < 16 && fd_ < 0; ++attempt) {
            temp_name_ = dir_ + "/." + basename_of(path_) + "." + random_suffix() + ".tmp";
            fd_ = ::open(temp_name_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
            if (fd_ < 0 && errno != EEXIST) break;
        }
        if (fd_ < 0) throw_io_error("create a temporary file in '" + dir_ + "' for", path_);
    }
    const std::array<unsigned char, kHeaderSize> placeholder{};
    write_all(placeholder.data(), placeholder.size());
}

StoreWriter::~StoreWriter() { discard(); }

void StoreWriter::discard() noexcept {
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
        if (!temp_name_.empty()) ::unlink(temp_name_.c_str());
    }
}

void StoreWriter::check_open() const {
    if (fd_ < 0) throw std::logic_error("the writer for '" + path_ + "' is already committed or discarded");
}

void StoreWriter::write_all(const void* data, std::size_t size) {
    auto p = static_cast<const char*>(data);
    kick_writeback();
    while (size > 0) {
        const std::size_t chunk = size < (std::size_t{1} << 30) ? size : (std::size_t{1} << 30);
        const ssize_t n = ::write(fd_, p, chunk);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw_io_error("write", path_);
        }
        p += n;
        size -= static_cast<std::size_t>(n);
        pos_ += static_cast<std::uint64_t>(n);
    }
}

void StoreWriter::kick_writeback() {
#ifdef SYNC_FILE_RANGE_WRITE
    // Start writing finished bytes to disk now, without waiting, so that the
    // fsync in commit() only waits for the tail instead of the whole file.
    constexpr std::uint64_t kKick = std::uint64_t{32} << 20;
    if (pos_ - synced_ >= kKick) {
        ::sync_file_range(fd_, static_cast<off_t>(synced_), static_cast<off_t>(pos_ - synced_), SYNC_FILE_RANGE_WRITE);
        synced_ = pos_;
    }
#endif
}

void StoreWriter::pad_to(std::uint64_t alignment) {
    static const std::array<unsigned char, kFeatureAlign> zeros{};
    const std::uint64_t rem = pos_ % alignment;
    if (rem) write_all(zeros.data(), static_cast<std::size_t>(alignment - rem));
}

void StoreWriter::start_section(std::string name, DType dtype, std::uint64_t alignment) {
    check_open();
    if (in_section_) throw std::logic_error("section '" + current_.name + "' is still open");
    if (name.empty() || name.size() >= kSectionNameSize)
        throw std::invalid_argument("section name '" + name + "' must be 1..63 bytes");
    for (const auto& s : sections_)
        if (s.name == name) throw std::invalid_argument("section '" + name + "' was already written");
    pad_to(alignment);
    current_ = Section{};
    current_.name = std::move(name);
    current_.dtype = dtype;
    current_.offset = pos_;
    hasher_ = Hasher64{};
    current_bytes_ = 0;
    in_section_ = true;
}

void StoreWriter::finish_section(std::vector<std::uint64_t> shape) {
    std::uint64_t count = 1;
    for (auto d : shape) count *= d;
    if (count * dtype_size(current_.dtype) != current_bytes_)
        throw std::invalid_argument("section '" + current_.name + "': " + std::to_string(current_bytes_) +
                                    " bytes were written, its shape needs " +
                                    std::to_string(count * dtype_size(current_.dtype)));
    current_.length = current_bytes_;
    current_.checksum = hasher_.digest();
    current_.shape = std::move(shape);
    sections_.push_back(current_);
    in_section_ = false;
}

void StoreWriter::add_section(std::string name, DType dtype, std::vector<std::uint64_t> shape, const void* data,
                              std::size_t size) {
    if (in_features_) throw std::logic_error("feature column '" + feat_column_ + "' is still open");
    start_section(std::move(name), dtype, kSectionAlign);
    hasher_.update(data, size);
    write_all(data, size);
    current_bytes_ = size;
    finish_section(std::move(shape));
}

void StoreWriter::add_strings(std::string_view name, const std::vector<std::string>& values) {
    std::vector<std::int64_t> offsets;
    offsets.reserve(values.size() + 1);
    std::string data;
    offsets.push_back(0);
    for (const auto& v : values) {
        data += v;
        offsets.push_back(static_cast<std::int64_t>(data.size()));
    }
    add_section(std::string(name) + std::string(schema::kOffsetsSuffix), DType::Int64, {offsets.size()},
                offsets.data(), offsets.size() * sizeof(std::int64_t));
    add_section(std::string(name) + std::string(schema::kDataSuffix), DType::UInt8, {data.size()}, data.data(),
                data.size());
}

void StoreWriter::begin_features(const std::string& column, DType dtype, std::uint64_t segments,
                                 std::uint64_t channels) {
    if (!schema::valid_column_name(column))
        throw std::invalid_argument("column name '" + column +
                                    "' must be 1..40 characters of [A-Za-z0-9_-] and not 'offsets'");
    if (dtype != DType::Float32 && dtype != DType::Float16)
        throw std::invalid_argument("feature column '" + column + "' must be float32 or float16");
    if (channels == 0) throw std::invalid_argument("feature column '" + column + "' needs C > 0 channels");
    if (in_features_) throw std::logic_error("feature column '" + feat_column_ + "' is still open");
    start_section(std::string(schema::kFeaturePrefix) + column, dtype, kFeatureAlign);
    in_features_ = true;
    feat_column_ = column;
    feat_segments_ = segments;
    feat_channels_ = channels;
    block_hasher_ = Hasher64{};
    block_fill_ = 0;
    block_sums_.clear();
    stats_ = ChannelStats(channels);
    stats_given_.clear();
}

void StoreWriter::set_feature_stats(const std::vector<float>& mean_then_std) {
    if (!in_features_) throw std::logic_error("set_feature_stats() outside begin_features()/end_features()");
    const std::size_t c = static_cast<std::size_t>(feat_channels_);
    if (mean_then_std.size() != 2 * c)
        throw std::invalid_argument("column '" + feat_column_ + "' has " + std::to_string(c) +
                                    " channels: its statistics are " + std::to_string(2 * c) +
                                    " values (C means, then C standard deviations), got " +
                                    std::to_string(mean_then_std.size()));
    for (std::size_t k = 0; k < 2 * c; ++k) {
        const float v = mean_then_std[k];
        const bool is_std = k >= c;
        if (!std::isfinite(v) || (is_std && v < 0))
            throw std::invalid_argument("column '" + feat_column_ + "': channel " + std::to_string(is_std ? k - c : k) +
                                        " has " + (is_std ? "standard deviation " : "mean ") + std::to_string(v) +
                                        (is_std ? " (a finite value >= 0 is needed)" : " (a finite value is needed)"));
    }
    stats_given_ = mean_then_std;
}

void StoreWriter::hash_blocks(const unsigned char* data, std::size_t size) {
    while (size > 0) {
        const std::uint64_t room = kBlockSize - block_fill_;
        const std::size_t take = size < room ? size : static_cast<std::size_t>(room);
        block_hasher_.update(data, take);
        block_fill_ += take;
        data += take;
        size -= take;
        if (block_fill_ == kBlockSize) {
            block_sums_.push_back(static_cast<std::int64_t>(block_hasher_.digest()));
            block_hasher_ = Hasher64{};
            block_fill_ = 0;
        }
    }
}

void StoreWriter::append_features(const void* data, std::size_t size) {
    if (!in_features_) throw std::logic_error("append_features() outside begin_features()/end_features()");
    const std::uint64_t row_bytes = feat_channels_ * dtype_size(current_.dtype);
    if (size % row_bytes != 0)
        throw std::invalid_argument("column '" + feat_column_ + "': appended " + std::to_string(size) +
                                    " bytes, not a whole number of " + std::to_string(row_bytes) + "-byte rows");
    hasher_.update(data, size);
    hash_blocks(static_cast<const unsigned char*>(data), size);
    stats_.add(data, static_cast<std::size_t>(size / row_bytes), current_.dtype);
    write_all(data, size);
    current_bytes_ += size;
}

void StoreWriter::end_features(const std::vector<std::int64_t>& row_counts) {
    if (!in_features_) throw std::logic_error("end_features() without begin_features()");
    const std::uint64_t row_bytes = feat_channels_ * dtype_size(current_.dtype);
    const std::uint64_t rows = current_bytes_ / row_bytes;
    in_features_ = false;
    if (block_fill_ > 0) block_sums_.push_back(static_cast<std::int64_t>(block_hasher_.digest()));
    block_fill_ = 0;
    const auto add_blocks = [this] {
        const std::string base = std::string(schema::kFeaturePrefix) + feat_column_;
        add_section(base + std::string(schema::kBlocksSuffix), DType::Int64, {block_sums_.size()},
                    block_sums_.data(), block_sums_.size() * sizeof(std::int64_t));
        const std::vector<float> stats = stats_given_.empty() ? stats_.result() : stats_given_;
        add_section(base + std::string(schema::kStatsSuffix), DType::Float32, {2, feat_channels_}, stats.data(),
                    stats.size() * sizeof(float));
    };
    if (feat_segments_ != 0) {
        if (!row_counts.empty())
            throw std::invalid_argument("column '" + feat_column_ + "' is fixed-T; row counts are for ragged columns");
        finish_section({num_instances_, feat_segments_, feat_channels_});
        add_blocks();
        return;
    }
    if (row_counts.size() != num_instances_)
        throw std::invalid_argument("ragged column '" + feat_column_ + "' needs " + std::to_string(num_instances_) +
                                    " row counts, got " + std::to_string(row_counts.size()));
    std::vector<std::int64_t> offsets(row_counts.size() + 1, 0);
    for (std::size_t i = 0; i < row_counts.size(); ++i) {
        // T_i = 0 would leave nothing to sample: the format requires T > 0 (FORMAT.md), and readers refuse it.
        if (row_counts[i] <= 0)
            throw std::invalid_argument("ragged column '" + feat_column_ + "': instance " + std::to_string(i) +
                                        " has " + std::to_string(row_counts[i]) +
                                        " rows; every instance needs T > 0 rows");
        offsets[i + 1] = offsets[i] + row_counts[i];
    }
    if (static_cast<std::uint64_t>(offsets.back()) != rows)
        throw std::invalid_argument("ragged column '" + feat_column_ + "': row counts add up to " +
                                    std::to_string(offsets.back()) + " but " + std::to_string(rows) +
                                    " rows were appended");
    finish_section({rows, feat_channels_});
    add_section(std::string(schema::kFeaturePrefix) + feat_column_ + std::string(schema::kOffsetsSuffix),
                DType::Int64, {offsets.size()}, offsets.data(), offsets.size() * sizeof(std::int64_t));
    add_blocks();
}

void StoreWriter::commit() {
    check_open();
    if (in_section_ || in_features_) throw std::logic_error("commit() with section '" + current_.name + "' open");
    validate_schema(sections_, num_instances_, path_, kFormatVersion);

    pad_to(kSectionAlign);
    Header h;
    h.num_instances = num_instances_;
    h.table_offset = pos_;
    h.num_sections = static_cast<std::uint32_t>(sections_.size());
    std::vector<unsigned char> table;
    table.reserve(sections_.size() * kSectionEntrySize);
    for (const auto& s : sections_) {
        const auto e = encode_section(s);
        table.insert(table.end(), e.begin(), e.end());
    }
    write_all(table.data(), table.size());
    h.file_size = pos_;
    auto header = encode_header(h);
    h.checksum = header_checksum(header.data(), table.data(), table.size());
    header = encode_header(h);
    if (::pwrite(fd_, header.data(), header.size(), 0) != static_cast<ssize_t>(header.size()))
        throw_io_error("write header", path_);
    if (::fsync(fd_) != 0) throw_io_error("fsync", path_);

    if (temp_name_.empty()) {
        // O_TMPFILE: give the inode a name. Without overwrite, link straight to
        // the target (fails with EEXIST if someone created it meanwhile).
        const std::string proc = "/proc/self/fd/" + std::to_string(fd_);
        if (overwrite_) {
            temp_name_ = dir_ + "/." + basename_of(path_) + "." + random_suffix() + ".tmp";
            if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, temp_name_.c_str(), AT_SYMLINK_FOLLOW) != 0) {
                temp_name_.clear();
                throw_io_error("link", path_);
            }
        } else if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, path_.c_str(), AT_SYMLINK_FOLLOW) != 0) {
            throw_io_error("link", path_);
        }
    }
    if (!temp_name_.empty()) {
        if (overwrite_) {
            if (::rename(temp_name_.c_str(), path_.c_str()) != 0) throw_io_error("rename", path_);
        } else {
            if (::link(temp_name_.c_str(), path_.c_str()) != 0) throw_io_error("link", path_);
            ::unlink(temp_name_.c_str());
        }
        temp_name_.clear();
    }
    ::close(fd_);
    fd_ = -1;
    fsync_dir(dir_);
}

}  // namespace finegym
