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

private:
    std::string path_;
    int fd_ = -1;
    const unsigned char* data_ = nullptr;  // not owning memory: owned by the mapping, released in the destructor
    std::uint64_t size_ = 0;
};

}  // namespace finegym
