"""The sandbox's harness script: run by ``python -I -S`` in the temporary directory, never imported.

``sspo_analysis.training.sandbox`` copies this file into each run's temporary
directory and feeds it a JSON spec on stdin. The process is a small trusted
*reaper*: it marks itself a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``),
forks one *worker* that starts a new session, applies the resource limits and
runs the program and its tests in order, reporting one line per test on a
private pipe (never through the program's stdout, which goes to /dev/null).
When the worker ends or the wall-clock deadline passes, the reaper kills the
worker's process group, then every process reparented to it (children that
left the group with ``setsid`` or ``setpgid`` come back to the subreaper when
their parent dies), until it has no child left. It prints the worker's pid on
the first line of stdout and a JSON summary on the last; the library reads
both. Only the standard library is used (``-S``: no site-packages).
"""

import json
import os
import resource
import select
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
MAX_REPORT_BYTES = 1 << 20


def set_subreaper():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def apply_limits(spec):
    cpu = max(1, int(spec["timeout_s"] + 0.999))
    mem = int(spec["memory_mb"]) << 20
    fsize = int(spec["max_file_mb"]) << 20
    nproc = int(spec["max_processes"])
    for which, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                         (resource.RLIMIT_NPROC, (nproc, nproc)), (resource.RLIMIT_FSIZE, (fsize, fsize)),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(which, value)


def describe(err):
    text = type(err).__name__
    try:
        detail = str(err)
        text += f": {detail}" if detail else ""
    except BaseException:  # a hostile __str__
        pass
    return text.replace("\n", " ")[:240]


def attempt(source, ns, name):
    """None if ``source`` ran, else ("memory" | "error", message)."""
    try:
        exec(compile(source, name, "exec"), ns)
        return None
    except MemoryError:
        return "memory", "MemoryError"
    except BaseException as err:  # SystemExit and KeyboardInterrupt from the program count as errors too
        return "error", describe(err)


def worker(spec, fd):
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 16)
    write, leave = os.write, os._exit  # bound now: the program may monkeypatch os

    def report(line):
        write(fd, (line.replace("\n", " ")[:300] + "\n").encode("utf-8", "replace"))

    apply_limits(spec)
    ballast = [bytearray(1 << 20)]  # released on MemoryError so that the report itself can allocate
    try:
        compile(spec["program"], "program.py", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        report("S " + describe(err))
        leave(0)
    ns = {"__name__": "solution"}
    steps = [("program", spec["program"])] + [tuple(item) for item in spec["items"]]
    test_index = 0
    for kind, source in steps:
        if kind == "entry":
            if source not in ns:
                report(f"E entry point {source!r} is not defined by the program")
                leave(0)
            ns["candidate"] = ns[source]
            continue
        outcome = attempt(source, ns, "program.py" if kind == "program" else "tests.py")
        if outcome is not None and outcome[0] == "memory":
            ballast.clear()
            ns.clear()
            report("M " + outcome[1])
            leave(0)
        if kind == "test":
            report(f"P {test_index}" if outcome is None else f"F {test_index} {outcome[1]}")
            test_index += 1
        elif outcome is not None:
            report(("E " if kind == "program" else "X ") + outcome[1])
            leave(0)
    report("D")
    leave(0)


def drain(fd, data):
    """Read what is available; False at end of file. Keeps at most MAX_REPORT_BYTES."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        if len(data) < MAX_REPORT_BYTES:
            data.extend(chunk[: MAX_REPORT_BYTES - len(data)])


def collect(pid, fd, timeout_s):
    """The worker's report and whether the deadline passed before the worker ended."""
    os.set_blocking(fd, False)
    data, open_ = bytearray(), True
    deadline = time.monotonic() + timeout_s
    try:
        waiter = os.pidfd_open(pid)
    except (AttributeError, OSError):
        waiter = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, True
        watch = ([waiter] if waiter is not None else []) + ([fd] if open_ else [])
        ready = select.select(watch, [], [], left if waiter is not None else min(left, 0.005))[0]
        if fd in ready:
            open_ = drain(fd, data)
        if (waiter is not None and waiter in ready) or (waiter is None and exited(pid)):
            if open_:
                drain(fd, data)
            return data, False


def exited(pid):
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def children(ppid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == ppid:
                found.append(int(name))
    return found


def reap_all(limit_s=3.0):
    """Kill and reap every child (orphans are reparented here); True once none is left."""
    me, end = os.getpid(), time.monotonic() + limit_s
    while time.monotonic() < end:
        kids = children(me)
        for kid in kids:
            try:
                os.kill(kid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return True
        if not kids:
            time.sleep(0.001)
    return False


def main():
    spec = json.loads(sys.stdin.buffer.read())
    subreaper = set_subreaper()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            worker(spec, write_end)
        finally:
            os._exit(70)
    os.close(write_end)
    sys.stdout.write(f"{pid}\n")
    sys.stdout.flush()
    data, timed_out = collect(pid, read_end, spec["timeout_s"])
    try:
        os.killpg(pid, signal.SIGKILL)  # the worker's session and group: no child outlives the run
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    clean = reap_all()
    sys.stdout.write(json.dumps({
        "lines": data.decode("utf-8", "replace").splitlines(), "timed_out": timed_out,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "clean": clean, "subreaper": subreaper}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
