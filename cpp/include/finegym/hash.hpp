// XXH64 (the 64-bit xxHash algorithm, seed 0), written from its public
// specification. Used for the header checksum and every section checksum:
// it runs at memory speed, so checksumming does not slow conversion down.
#pragma once

#include <cstddef>
#include <cstdint>

namespace finegym {

class Hasher64 {
public:
    explicit Hasher64(std::uint64_t seed = 0) noexcept;
    void update(const void* data, std::size_t size) noexcept;
    std::uint64_t digest() const noexcept;

private:
    std::uint64_t seed_;
    std::uint64_t acc_[4];
    unsigned char buf_[32];
    std::size_t buffered_ = 0;
    std::uint64_t total_ = 0;
};

std::uint64_t hash64(const void* data, std::size_t size, std::uint64_t seed = 0) noexcept;

}  // namespace finegym
