#include "finegym/fault_guard.hpp"

#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <mutex>

#include "finegym/errors.hpp"
#include "finegym/hash.hpp"

namespace finegym {
namespace {

// Armed while a guarded function runs on this thread; null otherwise.
thread_local sigjmp_buf* t_jump = nullptr;
// Set once this thread handed a SIGBUS on to the previous handler: a second
// one means that handler came back to ours, so fall back to the default
// action rather than bounce between the two forever.
thread_local volatile sig_atomic_t t_chained = 0;

std::mutex g_install_mutex;
struct sigaction g_previous {};  // the handler ours replaced; written under g_install_mutex

void on_sigbus(int sig, siginfo_t* info, void* uctx) {
    (void)uctx;
    if (t_jump != nullptr && info != nullptr && info->si_code > 0) {
        sigjmp_buf* jump = t_jump;
        t_jump = nullptr;
        siglongjmp(*jump, 1);
    }
    // Not ours to handle: restore the previous disposition. A fault then
    // re-executes on return and reaches it; a signal sent with kill() is
    // raised again, and (SA_NODEFER) delivered to it at once.
    const int saved_errno = errno;
    struct sigaction prev = g_previous;
    if (t_chained) {
        prev = {};
        prev.sa_handler = SIG_DFL;
    }
    t_chained = 1;
    ::sigaction(sig, &prev, nullptr);
    if (info == nullptr || info->si_code <= 0) ::raise(sig);
    errno = saved_errno;
}

bool ours(const struct sigaction& sa) {
    return (sa.sa_flags & SA_SIGINFO) != 0 && sa.sa_sigaction == &on_sigbus;
}

}  // namespace

void ensure_sigbus_handler() {
    struct sigaction current {};
    if (::sigaction(SIGBUS, nullptr, &current) == 0 && ours(current)) return;
    std::lock_guard<std::mutex> lock(g_install_mutex);
    if (::sigaction(SIGBUS, nullptr, &current) == 0 && ours(current)) return;
    struct sigaction sa {};
    sa.sa_sigaction = &on_sigbus;
    // SA_NODEFER: SIGBUS stays unblocked in the handler, so jumping out of it
    // leaves the signal mask as it was and sigsetjmp need not save it (no
    // system call per guarded region).
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    struct sigaction previous {};
    if (::sigaction(SIGBUS, &sa, &previous) == 0) g_previous = previous;
}

bool guard_sigbus_raw(void (*fn)(void*), void* ctx) noexcept {
    sigjmp_buf jump;
    sigjmp_buf* const outer = t_jump;  // guarded regions may nest
    if (sigsetjmp(jump, 0) != 0) {  // 0: no mask to save (SA_NODEFER, above)
        t_jump = outer;
        return false;
    }
    t_jump = &jump;
    fn(ctx);
    t_jump = outer;
    return true;
}

void throw_mapping_fault(const std::string& path, const std::string& during) {
    errno = EIO;
    throw IoError("reading '" + path + "' failed during " + during +
                      ": the file changed under its memory mapping (SIGBUS: truncated or rewritten "
                      "while open?); reopen it",
                  EIO, path);
}

void copy_mapped(void* dst, const unsigned char* src, std::size_t size, const std::string& path,
                 const std::string& during) {
    if (size == 0) return;
    ensure_sigbus_handler();
    if (!guard_sigbus([&] { std::memcpy(dst, src, size); })) throw_mapping_fault(path, during);
}

std::uint64_t hash_mapped(const unsigned char* src, std::size_t size, const std::string& path,
                          const std::string& during) {
    ensure_sigbus_handler();
    std::uint64_t h = 0;
    if (!guard_sigbus([&] { h = hash64(src, size); })) throw_mapping_fault(path, during);
    return h;
}

}  // namespace finegym
