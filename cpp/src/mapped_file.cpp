#include "finegym/mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "finegym/errors.hpp"

namespace finegym {

MappedFile::MappedFile(const std::string& path, std::size_t min_size) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw_io_error("open", path);
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
        ::close(fd_);
        throw_io_error("fstat", path);
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd_);
        errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        throw_io_error("open (not a regular file)", path);
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
    if (size_ < min_size) {
        ::close(fd_);
        throw FormatError("'" + path + "' is not a valid finegym-store file: it is " + std::to_string(size_) +
                          " bytes, smaller than the " + std::to_string(min_size) + "-byte header");
    }
    void* p = ::mmap(nullptr, static_cast<std::size_t>(size_), PROT_READ, MAP_SHARED, fd_, 0);
    if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd_);
        errno = err;
        throw_io_error("mmap", path);
    }
    data_ = static_cast<const unsigned char*>(p);
}

std::uint64_t MappedFile::current_size() const {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw_io_error("fstat", path_);
    return static_cast<std::uint64_t>(st.st_size);
}

void MappedFile::check_not_truncated(const char* during) const {
    const std::uint64_t now = current_size();
    if (now < size_)
        throw IoError("'" + path_ + "' is now " + std::to_string(now) + " bytes, smaller than the " +
                          std::to_string(size_) + " bytes mapped when it was opened (truncated or rewritten while " +
                          "open?); " + during + " would read past its end: reopen it",
                      EIO, path_);
}

MappedFile::~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), static_cast<std::size_t>(size_));
    if (fd_ >= 0) ::close(fd_);
}

}  // namespace finegym
