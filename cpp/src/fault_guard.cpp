#include "finegym/fault_guard.hpp"

#include <pthread.h>

#include <atomic>
#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <mutex>

#include "finegym/errors.hpp"
#include "finegym/hash.hpp"

namespace finegym {
namespace {

// Thread-local state the handler reads. Initial-exec TLS: the variables live
// in the static TLS block set up with each thread, so touching them is a plain
// load at a fixed offset, with no lazy allocation (__tls_get_addr) that would
// not be async-signal-safe on a thread that has never used them. Trivial
// types with constant initialisers only (no TLS init/destructor wrappers).
// Armed while a guarded function runs on this thread; null otherwise.
thread_local sigjmp_buf* t_jump __attribute__((tls_model("initial-exec"))) = nullptr;
// Set while this thread runs the previous handler from ours (chain()). A
// signal re-raised into ours meanwhile means that handler handed it back to
// us (it re-installed ours, as faulthandler restores "its previous" and
// raises): the default action ends the loop instead of bouncing between the
// two forever.
thread_local volatile sig_atomic_t t_chained __attribute__((tls_model("initial-exec"))) = 0;

// The disposition ours replaced. Each install writes one node (outside the
// handler, under g_install_mutex) and only then publishes it through
// g_previous with a release store; the handler loads it with acquire. A
// published node is never written again and never freed, so the handler
// reads a complete struct however an install on another thread interleaves.
// Nodes are reused when the same disposition is replaced again (a library
// that keeps re-installing itself), so their number stays small.
struct Previous {
    struct sigaction action;
    Previous* next;  // all nodes, for reuse; read and written under g_install_mutex
};
std::mutex g_install_mutex;
Previous* g_nodes = nullptr;
std::atomic<const Previous*> g_previous{nullptr};
static_assert(std::atomic<const Previous*>::is_always_lock_free, "the handler needs a lock-free load");

void on_sigbus(int sig, siginfo_t* info, void* uctx);

bool ours(const struct sigaction& sa) {
    return (sa.sa_flags & SA_SIGINFO) != 0 && sa.sa_sigaction == &on_sigbus;
}

// Linux's signals are 1..64 (glibc's sigset_t has room for 1024).
constexpr int kLastSignal = 64;

// sigaction() fills only the kernel's part of sa_mask: copy the members into
// a clean set, so that masks compare and are used as the kernel sees them.
sigset_t clean_mask(const sigset_t& mask) {
    sigset_t out;
    sigemptyset(&out);
    for (int s = 1; s <= kLastSignal; ++s)
        if (sigismember(&mask, s) == 1) sigaddset(&out, s);
    return out;
}

bool same_action(const struct sigaction& a, const struct sigaction& b) {
    if (a.sa_flags != b.sa_flags) return false;
    if ((a.sa_flags & SA_SIGINFO) != 0 ? a.sa_sigaction != b.sa_sigaction : a.sa_handler != b.sa_handler)
        return false;
    for (int s = 1; s <= kLastSignal; ++s)
        if (sigismember(&a.sa_mask, s) != sigismember(&b.sa_mask, s)) return false;
    return true;
}

// Publishes `replaced` as the previous disposition (never ours: a
// disposition that is ours would make the handler call itself).
void publish_previous(const struct sigaction& replaced) {
    struct sigaction action = replaced;
    action.sa_mask = clean_mask(replaced.sa_mask);
    if (ours(action)) return;
    Previous* node = g_nodes;
    while (node != nullptr && !same_action(node->action, action)) node = node->next;
    if (node == nullptr) {
        node = new Previous{action, g_nodes};  // never freed: the handler may read it at any time
        g_nodes = node;
    }
    g_previous.store(node, std::memory_order_release);
}

// The kernel's default action for `sig` (SIGBUS: end the process with a core
// dump). The disposition becomes SIG_DFL for the whole process, which is
// about to die anyway. A real fault (`refaults`) returns: the faulting access
// runs again and the kernel ends the process there, so the core shows the
// access itself. A signal sent with kill()/raise() (or a fault report that
// does not re-execute) is raised again, unblocked, and ends it at once.
void default_action(int sig, bool refaults) {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(sig, &dfl, nullptr);
    if (refaults) return;
    sigset_t unblock;
    sigemptyset(&unblock);
    sigaddset(&unblock, sig);
    ::pthread_sigmask(SIG_UNBLOCK, &unblock, nullptr);
    ::raise(sig);
}

// Hands the signal to the previous disposition as the kernel would have
// delivered it, without touching the process's disposition (ours stays
// installed for every thread):
//   - a handler is called directly (sa_sigaction with the same siginfo and
//     context for SA_SIGINFO, else sa_handler), with its sa_mask (and the
//     signal itself unless SA_NODEFER) blocked while it runs, as on delivery.
//     Its SA_ONSTACK and SA_RESETHAND are not emulated: it runs on the stack
//     ours runs on, and stays the previous handler.
//   - SIG_IGN: a kill()-sent signal is dropped; a real fault cannot be
//     ignored (the access would fault again forever; the kernel itself
//     forces the default action for a fault whose signal is ignored), so it
//     takes the default action.
//   - SIG_DFL: the default action (default_action()).
void chain(int sig, siginfo_t* info, void* uctx, bool fault, bool refaults) {
    const Previous* prev = g_previous.load(std::memory_order_acquire);
    if (prev == nullptr || (t_chained != 0 && !fault)) {  // none (cannot happen: published first), or a loop
        default_action(sig, refaults);
        return;
    }
    const struct sigaction& pa = prev->action;
    const bool siginfo = (pa.sa_flags & SA_SIGINFO) != 0;
    if (!siginfo && pa.sa_handler == SIG_IGN) {
        if (fault) default_action(sig, refaults);
        return;
    }
    if (!siginfo && pa.sa_handler == SIG_DFL) {
        default_action(sig, refaults);
        return;
    }
    sigset_t block = pa.sa_mask;
    if ((pa.sa_flags & SA_NODEFER) == 0) sigaddset(&block, sig);
    sigset_t old;
    ::pthread_sigmask(SIG_BLOCK, &block, &old);
    // A fault inside that handler must not jump to a guard it interrupted.
    sigjmp_buf* const armed = t_jump;
    const sig_atomic_t outer = t_chained;
    t_jump = nullptr;
    t_chained = 1;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    if (siginfo)
        pa.sa_sigaction(sig, info, uctx);
    else
        pa.sa_handler(sig);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    t_chained = outer;
    t_jump = armed;
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

void on_sigbus(int sig, siginfo_t* info, void* uctx) {
    // si_code > 0: sent by the kernel for a fault. <= 0: sent by a process
    // (kill, sigqueue, raise, pthread_kill), never a fault of ours, even on a
    // thread inside a guarded copy.
    const bool fault = info != nullptr && info->si_code > 0;
    // Whether returning re-executes the faulting access. An action-optional
    // machine-check report arrives asynchronously, for a page this thread may
    // not even be touching: it is neither a guarded fault nor one that
    // re-executes.
#ifdef BUS_MCEERR_AO
    const bool refaults = fault && info->si_code != BUS_MCEERR_AO;
#else
    const bool refaults = fault;
#endif
    if (refaults && t_jump != nullptr) {
        sigjmp_buf* jump = t_jump;
        t_jump = nullptr;
        siglongjmp(*jump, 1);
    }
    const int saved_errno = errno;
    chain(sig, info, uctx, fault, refaults);
    errno = saved_errno;
}

}  // namespace

void ensure_sigbus_handler() {
    struct sigaction current {};
    if (::sigaction(SIGBUS, nullptr, &current) == 0 && ours(current)) return;
    std::lock_guard<std::mutex> lock(g_install_mutex);
    if (::sigaction(SIGBUS, nullptr, &current) != 0 || ours(current)) return;
    // Publish what ours replaces before installing ours, so that the handler
    // never runs without it.
    publish_previous(current);
    struct sigaction sa {};
    sa.sa_sigaction = &on_sigbus;
    // SA_NODEFER: SIGBUS stays unblocked in the handler, so jumping out of it
    // leaves the signal mask as it was and sigsetjmp need not save it (no
    // system call per guarded region).
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    struct sigaction replaced {};
    // Another library may have changed the disposition since the read above
    // (it does not take our mutex): then what ours replaced is published too.
    // Until that store, a SIGBUS would be handed to `current` instead.
    if (::sigaction(SIGBUS, &sa, &replaced) == 0 && !same_action(replaced, current)) publish_previous(replaced);
}

bool guard_sigbus_raw(void (*fn)(void*), void* ctx) noexcept {
    sigjmp_buf jump;
    sigjmp_buf* const outer = t_jump;  // guarded regions may nest
    if (sigsetjmp(jump, 0) != 0) {  // 0: no mask to save (SA_NODEFER, above)
        t_jump = outer;
        return false;
    }
    t_jump = &jump;
    // The signal fences keep the compiler from moving fn's accesses to the
    // mapping out of the armed window.
    std::atomic_signal_fence(std::memory_order_seq_cst);
    fn(ctx);
    std::atomic_signal_fence(std::memory_order_seq_cst);
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
    // Guarded: memcpy only (plain bytes, no allocation, lock or destructor).
    if (!guard_sigbus([&] { std::memcpy(dst, src, size); })) throw_mapping_fault(path, during);
}

std::uint64_t hash_mapped(const unsigned char* src, std::size_t size, const std::string& path,
                          const std::string& during) {
    ensure_sigbus_handler();
    std::uint64_t h = 0;
    // Guarded: XXH64 over the bytes (arithmetic on a local state only).
    if (!guard_sigbus([&] { h = hash64(src, size); })) throw_mapping_fault(path, during);
    return h;
}

}  // namespace finegym
