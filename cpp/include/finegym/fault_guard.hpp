// Turning a SIGBUS on a mapped file into an exception.
//
// A store is mapped MAP_SHARED. If the file is truncated while mapped (by
// another process: `truncate`, `cp new old`, a crashed rewrite), touching a
// page past the new end raises SIGBUS, which would kill the process. Every
// copy or hash loop over the mapping runs inside guard_sigbus(): a SIGBUS on
// that thread while the loop runs jumps back out of it, and the caller throws
// an IoError naming the file instead.
//
// How: a process-wide SIGBUS handler (installed on first use, and re-installed
// by ensure_sigbus_handler() whenever someone else -- faulthandler, a sanitizer
// runtime -- has replaced it since) and a thread-local jump buffer armed only
// while a guarded loop runs. A fault (si_code > 0) on a thread whose buffer is
// armed jumps back out. Every other SIGBUS -- a fault outside a guarded loop,
// or one sent with kill()/raise()/pthread_kill(), on any thread -- is handed
// to the disposition that was installed before ours, and ours stays installed
// for every thread:
//   - a handler (C, or Python's signal.signal(), which is a C handler) is
//     called from ours with the same arguments and its signal mask;
//   - SIG_IGN: a sent signal is dropped; a fault takes the default action
//     (as the kernel does for an ignored fault: it cannot be ignored);
//   - SIG_DFL: the default action, so crashes elsewhere still crash as they
//     would without us: the disposition is reset to SIG_DFL and a fault
//     re-executes (the process dies at the faulting access, with a core), a
//     sent signal is raised again;
//   - a handler that hands the signal back to ours while ours is calling it
//     (it restores ours as "its previous" and raises again, as faulthandler
//     does when it and ours each replaced the other) gets the default action
//     for that second signal instead of a loop.
//
// The guarded function must run over plain data only: no object with a
// destructor (the jump skips destructors), no allocation and no lock (the
// jump would leave the allocator or the lock in whatever state the fault
// interrupted), and no throw (guard_sigbus is noexcept: a throw terminates):
// plain pointer loops, memcpy, hashing, conversions into caller-owned memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace finegym {

// Installs the handler if it is not the current SIGBUS handler. Thread-safe;
// one sigaction() call when nothing changed. guard_sigbus() does not call it:
// call it once per operation, on the calling thread, before guarded work
// (worker threads then only arm their jump buffer, no system call).
void ensure_sigbus_handler();

// Runs fn(ctx). Returns false if a SIGBUS hit this thread while it ran (fn
// was abandoned part-way), true otherwise.
bool guard_sigbus_raw(void (*fn)(void*), void* ctx) noexcept;

template <typename Fn>
bool guard_sigbus(Fn&& fn) noexcept {
    return guard_sigbus_raw([](void* p) { (*static_cast<std::remove_reference_t<Fn>*>(p))(); },
                            const_cast<void*>(static_cast<const void*>(&fn)));
}

// The IoError (EIO) for a SIGBUS while reading `path`.
[[noreturn]] void throw_mapping_fault(const std::string& path, const std::string& during);

// Guarded memcpy / XXH64 over mapped bytes; throw IoError naming `path` on SIGBUS.
void copy_mapped(void* dst, const unsigned char* src, std::size_t size, const std::string& path,
                 const std::string& during);
std::uint64_t hash_mapped(const unsigned char* src, std::size_t size, const std::string& path,
                          const std::string& during);

}  // namespace finegym
