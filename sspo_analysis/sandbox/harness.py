"""The sandbox's harness: run as ``python -I -S harness.py`` inside the sandbox, where it only computes.

``sspo_analysis.sandbox`` starts it with a JSON spec on stdin: the program, the calls to
make (a function name and the literal text of its arguments, see ``sandbox/checks.py``) and the
limits. This process is a small *reaper* (a Linux child subreaper): it forks a *worker* that
starts a new session, applies the limits, runs the program, calls each function in turn and writes
one line per event on the result channel (this process's original stdout; the program's own stdout
and stderr go to /dev/null):

- ``L``: the program's top level ran; ``S|E|M <why>``: syntax error; error at import or missing
  entry point; out of memory;
- ``V <i> <literal>``: call ``i`` returned this value (a Python literal of builtin types only);
  ``R <i> <why>``: call ``i`` raised, or returned something that is not plain data;
- ``D``: every call was made.

When the worker ends or ``timeout_s`` passes, the reaper kills the worker's process group, then
every process reparented to it, and writes ``Z <timed out 0|1> <exit code|-> <signal|->`` (after
``W <worker pid>`` at the start). Nothing here is trusted by the grader: the program can write any
of these lines itself, so the grader decides a test only by comparing a value received here with
an expected value it never sends. Only the standard library is used (``-S``: no site-packages);
the library imports :func:`decode` from here, so both sides read values the same way.
"""

import ast
import json
import os
import resource
import select
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
MAX_VALUE_CHARS = 1 << 16
"""The longest value sent back (its literal text, 64 KiB); a longer one fails its call. It bounds what the grader
parses, whatever the program writes."""
MAX_NODES = 1 << 20
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def decode(text):
    """The value of a Python literal of builtin types (``inf``, ``nan`` too); ValueError or SyntaxError if not one."""
    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):  # inf and nan are the only names a value's repr holds
        if isinstance(node, ast.Name) and node.id not in ("inf", "nan"):
            raise ValueError(f"not a literal: name {node.id!r}")
    tree = _Numbers().visit(tree)
    return ast.literal_eval(tree)


class _Numbers(ast.NodeTransformer):
    def visit_Name(self, node):
        return ast.copy_location(ast.Constant(float(node.id)), node)


def encode(value):
    """The literal text of ``value`` if it is built of builtin literal types only (exact types), else None."""
    budget = [MAX_NODES]

    def plain(item, depth):
        budget[0] -= 1
        kind = type(item)
        if kind in _PLAIN:
            return True
        if budget[0] < 0 or depth > 100:
            return False
        if kind in (list, tuple, set):
            return all(plain(x, depth + 1) for x in item)
        if kind is dict:
            return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in item.items())
        return False

    if not plain(value, 0):
        return None
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than sys.get_int_max_str_digits()
        return None
    return text if len(text) <= MAX_VALUE_CHARS else None


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


def sender(channel):
    """A function writing one line on the channel (bound now: the program may patch ``os`` later)."""
    write = os.write

    def send(line):
        data = (line.replace("\n", " ") + "\n").encode("utf-8", "replace")
        while data:
            data = data[write(channel, data):]

    return send


def answer(send, index, function, args, kwargs):
    """Make call ``index`` and send its value (``V``) or why there is none (``R``); False on MemoryError."""
    try:
        value = function(*decode(args), **decode(kwargs))
    except MemoryError:
        return False
    except BaseException as err:  # SystemExit and KeyboardInterrupt from the program count as errors too
        send(f"R {index} raised {describe(err)}")
        return True
    text = encode(value)
    if text is None:
        send(f"R {index} returned a {type(value).__name__}, not plain data (or more than {MAX_VALUE_CHARS} chars)")
    else:
        send(f"V {index} {text}")
    return True


def worker(spec, channel):
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.closerange(3, channel)
    os.closerange(channel + 1, 1 << 16)
    send, leave = sender(channel), os._exit
    apply_limits(spec)
    ballast = [bytearray(1 << 20)]  # released on MemoryError so that the report itself can allocate
    try:
        code = compile(spec["program"], "program.py", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        send("S " + describe(err))
        leave(0)
    ns = {"__name__": "solution"}
    try:
        exec(code, ns)
    except MemoryError:
        ballast.clear()
        send("M MemoryError at import")
        leave(0)
    except BaseException as err:
        send("E " + describe(err))
        leave(0)
    send("L")
    entry = spec.get("entry_point")
    if entry and not callable(ns.get(entry)):
        send(f"E entry point {entry!r} is not defined by the program")
        leave(0)
    for index, (name, args, kwargs) in enumerate(spec["calls"]):
        function = ns.get(name)
        if not callable(function):
            send(f"R {index} the program defines no function {name!r}")
        elif not answer(send, index, function, args, kwargs):
            ballast.clear()
            send(f"M MemoryError in {name}()")
            leave(0)
    send("D")
    leave(0)


def wait_for(pid, timeout_s):
    """Wait until the worker ends; True if ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    try:
        waiter = os.pidfd_open(pid)
    except (AttributeError, OSError):
        waiter = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        if waiter is not None:
            if select.select([waiter], [], [], left)[0]:
                return False
        elif os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return False
        else:
            time.sleep(min(left, 0.005))


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
    channel = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1):
        os.dup2(null, target)
    set_subreaper()
    pid = os.fork()
    if pid == 0:
        try:
            worker(spec, channel)
        finally:
            os._exit(70)
    send = sender(channel)
    send(f"W {pid}")
    timed_out = wait_for(pid, spec["timeout_s"])
    try:
        os.killpg(pid, signal.SIGKILL)  # the worker's session and group: no child outlives the run
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    reap_all()
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else "-"
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else "-"
    send(f"Z {int(timed_out)} {code} {sig}")


if __name__ == "__main__":
    main()
