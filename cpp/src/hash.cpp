#include "finegym/hash.hpp"

#include <cstring>

namespace finegym {
namespace {

constexpr std::uint64_t P1 = 11400714785074694791ULL;
constexpr std::uint64_t P2 = 14029467366897019727ULL;
constexpr std::uint64_t P3 = 1609587929392839161ULL;
constexpr std::uint64_t P4 = 9650029242287828579ULL;
constexpr std::uint64_t P5 = 2870177450012600261ULL;

inline std::uint64_t rotl(std::uint64_t x, int r) noexcept { return (x << r) | (x >> (64 - r)); }

// Little-endian loads; the format is little-endian and so are the hosts we
// build for (format.cpp refuses to compile elsewhere).
inline std::uint64_t load64(const unsigned char* p) noexcept {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}
inline std::uint32_t load32(const unsigned char* p) noexcept {
    std::uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

inline std::uint64_t round(std::uint64_t acc, std::uint64_t lane) noexcept {
    acc += lane * P2;
    acc = rotl(acc, 31);
    return acc * P1;
}

inline std::uint64_t merge(std::uint64_t acc, std::uint64_t v) noexcept {
    acc ^= round(0, v);
    return acc * P1 + P4;
}

}  // namespace

Hasher64::Hasher64(std::uint64_t seed) noexcept
    : seed_(seed), acc_{seed + P1 + P2, seed + P2, seed, seed - P1}, buf_{} {}

void Hasher64::update(const void* data, std::size_t size) noexcept {
    auto p = static_cast<const unsigned char*>(data);
    total_ += size;
    if (buffered_ + size < 32) {
        if (size) std::memcpy(buf_ + buffered_, p, size);
        buffered_ += size;
        return;
    }
    if (buffered_) {
        std::size_t fill = 32 - buffered_;
        std::memcpy(buf_ + buffered_, p, fill);
        for (int i = 0; i < 4; ++i) acc_[i] = round(acc_[i], load64(buf_ + 8 * i));
        p += fill;
        size -= fill;
        buffered_ = 0;
    }
    std::uint64_t a0 = acc_[0], a1 = acc_[1], a2 = acc_[2], a3 = acc_[3];
    while (size >= 32) {
        a0 = round(a0, load64(p));
        a1 = round(a1, load64(p + 8));
        a2 = round(a2, load64(p + 16));
        a3 = round(a3, load64(p + 24));
        p += 32;
        size -= 32;
    }
    acc_[0] = a0; acc_[1] = a1; acc_[2] = a2; acc_[3] = a3;
    if (size) std::memcpy(buf_, p, size);
    buffered_ = size;
}

std::uint64_t Hasher64::digest() const noexcept {
    std::uint64_t h;
    if (total_ >= 32) {
        h = rotl(acc_[0], 1) + rotl(acc_[1], 7) + rotl(acc_[2], 12) + rotl(acc_[3], 18);
        for (int i = 0; i < 4; ++i) h = merge(h, acc_[i]);
    } else {
        h = seed_ + P5;
    }
    h += total_;
    const unsigned char* p = buf_;
    std::size_t n = buffered_;
    while (n >= 8) {
        h ^= round(0, load64(p));
        h = rotl(h, 27) * P1 + P4;
        p += 8;
        n -= 8;
    }
    if (n >= 4) {
        h ^= static_cast<std::uint64_t>(load32(p)) * P1;
        h = rotl(h, 23) * P2 + P3;
        p += 4;
        n -= 4;
    }
    while (n > 0) {
        h ^= static_cast<std::uint64_t>(*p) * P5;
        h = rotl(h, 11) * P1;
        ++p;
        --n;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

std::uint64_t hash64(const void* data, std::size_t size, std::uint64_t seed) noexcept {
    Hasher64 h(seed);
    h.update(data, size);
    return h.digest();
}

}  // namespace finegym
