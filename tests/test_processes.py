"""Processes named by PID and start time: descendants found, a zombie or a reused PID not alive."""

import subprocess
import sys
import time

from hlip_fed.deploy.processes import ManagedProcess, process_start_time, same_process_alive


def test_descendants_are_remembered_and_a_stopped_process_is_not_alive(tmp_path):
    # A shell whose child sleeps: the child is a descendant with its own start time.
    proc = ManagedProcess("sleeper", ["/bin/sh", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' & wait"],
                          tmp_path / "sleeper.log").start()
    deadline = time.monotonic() + 20
    while not proc.remember_descendants() and time.monotonic() < deadline:
        time.sleep(0.1)
    (child, started), = proc.helpers
    assert started == process_start_time(child) != "" and same_process_alive(child, started)
    assert not same_process_alive(child, started + "1")  # another process under a reused PID
    proc.stop()
    deadline = time.monotonic() + 10
    while same_process_alive(child, started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not same_process_alive(child, started)
    assert process_start_time(proc.pid) == ""  # the stopped daemon is gone (reaped)


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start_time(child.pid)
    time.sleep(1.0)  # exited, not yet reaped: a zombie
    assert started and not same_process_alive(child.pid, started)
    child.wait()
