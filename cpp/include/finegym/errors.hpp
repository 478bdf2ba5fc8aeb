// Exception types of the core. The bindings map each one to a Python type:
//   FormatError   -> finegym_store.FormatError (a ValueError)
//   NotFound      -> KeyError
//   IoError       -> OSError carrying errno and the path
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError
#pragma once

#include <stdexcept>
#include <string>

namespace finegym {

// A store file is damaged, truncated, foreign, or of an unsupported version.
class FormatError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A named thing (section, column, id) does not exist.
class NotFound : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A system call failed; `err` is the errno value, `path` the file involved.
class IoError : public std::runtime_error {
public:
    IoError(const std::string& what, int err, std::string path)
        : std::runtime_error(what), errno_(err), path_(std::move(path)) {}
    int error_number() const noexcept { return errno_; }
    const std::string& path() const noexcept { return path_; }

private:
    int errno_;
    std::string path_;
};

// Builds an IoError from errno for the call `call` on `path`.
[[noreturn]] void throw_io_error(const std::string& call, const std::string& path);

}  // namespace finegym
