// A read-only memory mapping of a whole file, owned RAII-style.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace finegym {

class MappedFile {
public:
    // Opens and maps `path` read-only. A file smaller than `min_size` bytes
    // raises FormatError (mapping it would be pointless and reading it unsafe).
    MappedFile(const std::string& path, std::size_t min_size);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    MappedFile(MappedFile&&) = delete;
    MappedFile& operator=(MappedFile&&) = delete;

    const unsigned char* data() const noexcept { return data_; }
    std::uint64_t size() const noexcept { return size_; }
    const std::string& path() const noexcept { return path_; }

    // The file's size now (fstat on the open descriptor): smaller than size()
    // when it was truncated after mapping, and touching the pages past its
    // end would then raise SIGBUS. Throws IoError if fstat fails.
    std::uint64_t current_size() const;
    // Throws IoError (EIO) naming the file, and `during`, if current_size() < size().
    void check_not_truncated(const char* during) const;

private:
    std::string path_;
    int fd_ = -1;
    const unsigned char* data_ = nullptr;  // not owning memory: owned by the mapping, released in the destructor
    std::uint64_t size_ = 0;
};

}  // namespace finegym
