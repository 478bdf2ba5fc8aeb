"""The SIGBUS guard next to other SIGBUS handling in the process.

The guard's handler catches faults in its own copies only and hands every
other SIGBUS to the disposition installed before it (fault_guard.hpp, FORMAT.md
"Hostile files and files changed while open"), without uninstalling itself.
Every scenario may kill its process, so each runs in a child Python."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import CHILD_CWD, synthetic_store

# The child's preamble: argv[1] is a copy of the store it may truncate,
# argv[2] a scenario. `guarded_read_on_a_thread()` installs the guard's
# handler and runs guarded copies on pool threads started from a thread that
# then ends; `sigbus_on_a_fresh_thread()` signals a thread that never ran a
# guarded copy (its first touch of the guard's thread-local state is in the
# handler); `truncated_gather()` checks that the guard still catches faults.
PRELUDE = textwrap.dedent(
    r"""
    import ctypes, os, signal, struct, sys, threading
    import finegym_store as fgs

    path, scenario = sys.argv[1], sys.argv[2]

    def guarded_read_on_a_thread(store):
        t = threading.Thread(target=lambda: store.gather("x", [0, 1, 2], num_segments=2, mode="test", threads=2))
        t.start()
        t.join()

    def sigbus_on_a_fresh_thread():
        t = threading.Thread(target=lambda: signal.pthread_kill(threading.get_ident(), signal.SIGBUS))
        t.start()
        t.join()

    def disposition():
        # The address of the process's SIGBUS handler (or SIG_DFL/SIG_IGN): the
        # first field of Linux's struct sigaction, read with sigaction(2).
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(1024)
        assert libc.sigaction(signal.SIGBUS, None, buf) == 0, ctypes.get_errno()
        return struct.unpack_from("P", buf.raw)[0]

    def truncated_gather(store):
        os.truncate(path, 0)
        try:
            store.gather("x", [0, 1, 2], num_segments=2, mode="test", threads=2)
        except OSError as e:
            assert path in str(e), str(e)
            print("gather raised OSError")
        else:
            print("gather did not raise")
    """
)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guard")
    synthetic_store(folder, 8, 2, shape=(12, 1024, 1, 1), seed=2)  # 48 KiB per instance: many pages
    return folder / "s.fgs"


def run_child(store_path, tmp_path, body: str, scenario: str = ""):
    path = tmp_path / "c.fgs"
    shutil.copyfile(store_path, path)
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), str(path), scenario],
                          capture_output=True, text=True, timeout=120, cwd=CHILD_CWD)


PYTHON_HANDLER = r"""
    hits = []
    signal.signal(signal.SIGBUS, lambda signum, frame: hits.append(signum))
    store = fgs.open(path)
    guarded_read_on_a_thread(store)
    guard = disposition()
    os.kill(os.getpid(), signal.SIGBUS)  # to the process: taken by this (main) thread
    sigbus_on_a_fresh_thread()
    same = [disposition() == guard]
    guarded_read_on_a_thread(store)
    os.kill(os.getpid(), signal.SIGBUS)  # the main thread again, after it handed one on
    sigbus_on_a_fresh_thread()
    same.append(disposition() == guard)
    # Python runs its handlers on the main thread, at the next check of the
    # interpreter's pending calls; a few statements reach one.
    for _ in range(1000):
        if len(hits) == 4:
            break
    print("python handler ran", len(hits), "times")
    print("guard stayed installed:", same)
    truncated_gather(store)
"""


def test_previous_python_handler_still_runs_and_guard_stays_installed(store_path, tmp_path):
    proc = run_child(store_path, tmp_path, PYTHON_HANDLER)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    # Every foreign SIGBUS reached the handler installed before the guard's
    # (not only the first: chaining does not uninstall the guard)...
    assert "python handler ran 4 times" in proc.stdout, proc.stdout
    # ...and the guard's handler stayed the process's, for every thread, and
    # still turns a fault in its copies into OSError.
    assert "guard stayed installed: [True, True]" in proc.stdout, proc.stdout
    assert "gather raised OSError" in proc.stdout, proc.stdout


IGNORED = r"""
    signal.signal(signal.SIGBUS, signal.SIG_IGN)
    store = fgs.open(path)
    guarded_read_on_a_thread(store)
    guard = disposition()
    os.kill(os.getpid(), signal.SIGBUS)
    sigbus_on_a_fresh_thread()
    print("survived; guard stayed installed:", disposition() == guard)
    truncated_gather(store)
"""


def test_sent_sigbus_stays_ignored_under_sig_ign(store_path, tmp_path):
    proc = run_child(store_path, tmp_path, IGNORED)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "survived; guard stayed installed: True" in proc.stdout, proc.stdout
    assert "gather raised OSError" in proc.stdout, proc.stdout


DEFAULT = r"""
    store = fgs.open(path)
    guarded_read_on_a_thread(store)
    view = store.column("x").values  # handed out before the truncation: not protected
    if scenario == "fault":
        os.truncate(path, 0)
        view.sum()
    elif scenario == "ignored_fault":  # SIG_IGN cannot ignore a fault: the kernel's default action
        signal.signal(signal.SIGBUS, signal.SIG_IGN)
        guarded_read_on_a_thread(store)  # the guard re-installs itself over SIG_IGN and chains to it
        os.truncate(path, 0)
        view.sum()
    elif scenario == "kill":
        os.kill(os.getpid(), signal.SIGBUS)
    elif scenario == "thread":
        sigbus_on_a_fresh_thread()
    print("survived")
"""


@pytest.mark.parametrize("scenario", ["fault", "ignored_fault", "kill", "thread"])
def test_sigbus_outside_a_guard_kills_under_the_default_disposition(store_path, tmp_path, scenario):
    proc = run_child(store_path, tmp_path, DEFAULT, scenario)
    assert "survived" not in proc.stdout
    # Under `bash .ci/asan` the sanitizer's own SIGBUS handler is the previous
    # one: it reports and exits with 1.
    sanitizer = "AddressSanitizer: BUS" in proc.stderr and proc.returncode == 1
    assert proc.returncode == -signal.SIGBUS or sanitizer, (proc.returncode, proc.stderr[-2000:])


MUTUAL = r"""
    import faulthandler
    store = fgs.open(path)
    guarded_read_on_a_thread(store)  # the guard's handler first ...
    faulthandler.enable()  # ... then faulthandler's, whose "previous" is the guard's ...
    guarded_read_on_a_thread(store)  # ... then the guard's again, whose previous is faulthandler's
    os.kill(os.getpid(), signal.SIGBUS)
    print("survived")
"""


def test_handlers_that_replaced_each_other_do_not_loop(store_path, tmp_path):
    # The guard calls faulthandler, which restores its previous handler (the
    # guard's) and raises again: the guard takes the default action for that
    # second signal instead of calling faulthandler again, forever.
    proc = run_child(store_path, tmp_path, MUTUAL)
    assert "survived" not in proc.stdout
    assert proc.stderr.count("Fatal Python error: Bus error") == 1, proc.stderr[-3000:]
    sanitizer = "AddressSanitizer: BUS" in proc.stderr and proc.returncode == 1
    assert proc.returncode == -signal.SIGBUS or sanitizer, (proc.returncode, proc.stderr[-2000:])
