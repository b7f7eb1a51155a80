"""Hostile programs against the sandbox (sspo_analysis/sandbox/): none earns reward it did not compute, none
changes anything outside, none outlives grading, and grading time stays bounded.

Every program here is *wrong* (its ``f`` does not compute what the tests ask), so any reward is a
forged one. Oracles are independent of the sandbox: the host's own ``/proc`` (a process name only a
hostile program uses), files and their hashes on the host, a socket server this test runs, and the
wall clock. Where harmless, the same attack run with ``sandbox="unsafe-process"`` (no isolation)
shows that the hostile program does work, so that a pass under bwrap is the sandbox's doing.
"""

import hashlib
import json
import os
import secrets
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sspo_analysis.sandbox import bwrap_problem, run_python
from sspo_analysis.training.tasks import CodeTask

pytestmark = [pytest.mark.skipif(bwrap_problem() is not None, reason=f"bubblewrap cannot run: {bwrap_problem()}"),
              pytest.mark.filterwarnings("ignore:sandbox 'unsafe-process'")]

TESTS = "assert f(1) == 2\nassert f(2) == 4\nassert f(3) == 6\n"
WRONG = "def f(x):\n    return 0\n"
TIMEOUT_S = 2.0
MARGIN_S = 4.0  # start-up and clean-up on a loaded 2-core machine


def graded(program: str, tests: str = TESTS, **kwargs):
    """``(result, seconds)`` of grading ``program`` with a short timeout."""
    start = time.monotonic()
    result = run_python(program, tests, timeout_s=kwargs.pop("timeout_s", TIMEOUT_S), **kwargs)
    return result, time.monotonic() - start


def survivors(token: str) -> list[int]:
    """Host processes named ``token`` (a name only the hostile program gives its processes)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and Path(f"/proc/{name}/comm").read_text().strip() == token:
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def no_survivors(token: str) -> bool:
    time.sleep(0.3)  # the last SIGKILLs are delivered asynchronously
    left = survivors(token)
    for pid in left:
        os.kill(pid, 9)
    return not left


# --------------------------------------------------------------------------- the issue's forgeries


ISSUE_FORGERIES = {
    "exec override": "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
    "report lines then exit": textwrap.dedent('''
        import os
        fake = b"P 0\\nP 1\\nP 2\\nD\\nL\\nV 0 0\\nZ 0 0 -\\n"
        for fd in range(256):
            try:
                os.write(fd, fake)
            except OSError:
                pass
        os._exit(0)
    '''),
    "frame walking": textwrap.dedent('''
        import sys
        frame = sys._getframe()
        while frame is not None:
            for scope in (frame.f_locals, frame.f_globals):
                for name, value in list(scope.items()):
                    if callable(value) and name in ("send", "report", "write"):
                        for line in ("P 0", "P 1", "P 2", "L", "D"):
                            try:
                                value(line) if name != "write" else None
                            except Exception:
                                pass
            frame = frame.f_back
    '''),
    "fake JSON to the reaper's stdout, then kill it": textwrap.dedent('''
        import json, os
        fake = json.dumps({"lines": ["P 0", "P 1", "P 2", "D"], "timed_out": False, "exit_code": 0}) + "\\n"
        parent = os.getppid()
        for fd in os.listdir(f"/proc/{parent}/fd"):
            try:
                with open(f"/proc/{parent}/fd/{fd}", "w") as fh:
                    fh.write("P 0\\nP 1\\nP 2\\nD\\n" + fake)
            except OSError:
                pass
        os.kill(parent, 9)
    '''),
    "patched abs": "import builtins\nbuiltins.abs = lambda x: 0\n",
}
EQ_ALWAYS = textwrap.dedent('''
    class Anything:
        def __eq__(self, other):
            return True
        __hash__ = object.__hash__
    class Int(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    def f(x):
        return Anything() if x == 1 else Int(0)
''')


def test_the_issue_reproduction_gives_zero_passed():
    result = run_python('def f(x): return 0\nimport builtins\nbuiltins.exec=lambda *a,**k: None\n',
                        'assert f(1)==2\nassert f(2)==4\n')
    assert (result.passed, result.total) == (0, 2) and result.status != "ok"


@pytest.mark.parametrize("name", list(ISSUE_FORGERIES))
def test_forgeries_of_the_issue_earn_nothing(name):
    tests = TESTS if name != "patched abs" else "assert abs(f(1) - 2) < 1e-9\nassert abs(f(2) - 4) < 1e-9\n"
    result, seconds = graded(WRONG + ISSUE_FORGERIES[name], tests)
    assert result.passed == 0 and result.status != "ok", result
    assert seconds < TIMEOUT_S + MARGIN_S


def test_objects_that_equal_everything_earn_nothing_also_through_check():
    result, _ = graded(EQ_ALWAYS, "assert f(1) == 2\nassert f(2) == 4\n")
    assert result.passed == 0 and "not plain data" in result.message
    check = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 4\n"
    result, _ = graded(EQ_ALWAYS, check, entry_point="f")
    assert (result.passed, result.total) == (0, 1)


@pytest.mark.parametrize("returned", ["str(x * x)", "str(x * x).encode()", "(x * x,)", "[x * x]", "Squared(x * x)"])
def test_the_right_value_in_another_type_earns_nothing(returned):
    # Values cross the channel as data: a string, bytes, a container or an object whose repr or __index__ reads
    # like the answer is not the answer (a grader comparing reprs or int() would pay these).
    program = ("class Squared:\n    def __init__(self, v): self.v = v\n    def __index__(self): return self.v\n"
               f"    def __repr__(self): return repr(self.v)\ndef f(x):\n    return {returned}\n")
    result, _ = graded(program, "assert f(2) == 4\nassert f(3) == 9\nassert f(0) == 0\n")
    assert (result.passed, result.total) == (0, 3) and result.status != "ok", result
    right, _ = graded("def f(x):\n    return x * x\n", "assert f(2) == 4\nassert f(3) == 9\nassert f(0) == 0\n")
    assert (right.passed, right.status) == (3, "ok")  # the same tests do pay the right program


def test_expected_values_never_enter_the_programs_process():
    # search() looks through every frame above it and every live object for a number made at run time;
    # f looks for the expected value x + 1, g (the control) for its argument x, which the sandbox does receive
    program = textwrap.dedent('''
        import gc, sys
        def search(needle):
            seen = []
            frame = sys._getframe().f_back.f_back
            while frame is not None:
                seen += list(frame.f_locals.values()) + list(frame.f_globals.values())
                frame = frame.f_back
            for obj in seen + gc.get_objects():
                if type(obj) is int and obj == needle:
                    return needle
                if isinstance(obj, (str, bytes, list, tuple, dict)) and str(needle) in repr(obj)[:100000]:
                    return needle
            return -1
        def f(x):
            return search(x + 1)
        def g(x):
            return search(x)
    ''')
    result, _ = graded(program, "assert f(7310522) == 7310523\nassert g(7310522) == 7310522\n")
    assert result.passed == 1 and "assert f(7310522) == 7310523: false (returned -1)" in result.message


def test_code_task_gives_the_issues_forgeries_reward_zero(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "Write f(x) = 2x.", "tests": TESTS}) + "\n")
    task = CodeTask(path=str(path), timeout_s=TIMEOUT_S, memory_mb=256)
    programs = [WRONG + attack for attack in ISSUE_FORGERIES.values()] + [EQ_ALWAYS, "def f(x):\n    return 2 * x\n"]
    _, answers = task.sample(np.random.default_rng(0), len(programs))
    assert task.rewards([f"```python\n{p}\n```" for p in programs], answers, workers=2) == [0.0] * 6 + [1.0]


# --------------------------------------------------------------------------- secrets, files, network


def test_the_host_environment_is_invisible(monkeypatch):
    marker = "SSPO_HOSTILE_" + secrets.token_hex(8)
    monkeypatch.setenv("SSPO_SECRET_TOKEN", marker)  # the grader's own environment
    holder = __import__("subprocess").Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                            env={**os.environ, "SSPO_SECRET_TOKEN": marker})  # a trainer's
    program = textwrap.dedent(f'''
        import os
        def f(x):
            places = ["/proc/1/environ", "/proc/self/environ", f"/proc/{{os.getppid()}}/environ",
                      "/proc/{os.getpid()}/environ", "/proc/{holder.pid}/environ"]
            places += [f"/proc/{{p}}/environ" for p in os.listdir("/proc") if p.isdigit()]
            found = "{marker}" in repr(dict(os.environ))
            for place in places:
                try:
                    found = found or b"{marker}" in open(place, "rb").read()
                except OSError:
                    pass
            return int(found)
    ''')
    try:
        contained, _ = graded(program, "assert f(0) == 1\n")
        control, _ = graded(program, "assert f(0) == 1\n", sandbox="unsafe-process")
    finally:
        holder.kill()
        holder.wait()
    assert contained.passed == 0 and "returned 0" in contained.message
    assert control.passed == 1  # without the sandbox the program does find the token


def test_files_outside_cannot_be_written_or_deleted(tmp_path):
    bashrc = Path.home() / ".bashrc"
    before = hashlib.sha256(bashrc.read_bytes()).hexdigest() if bashrc.exists() else None
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    inside = Path(sys.base_prefix) / f"sspo-victim-{secrets.token_hex(4)}"  # visible, read-only, in the sandbox
    try:
        inside.write_text("keep me too")
    except OSError:
        inside = victim
    marker = tmp_path / "marker.txt"
    program = textwrap.dedent(f'''
        import os
        def attempt(action):
            try:
                action()
                return 1
            except OSError:
                return 0
        def f(x):
            done = attempt(lambda: open({str(marker)!r}, "w").write("escaped"))
            done += attempt(lambda: os.remove({str(victim)!r}))
            done += attempt(lambda: os.remove({str(inside)!r}))
            done += attempt(lambda: open({str(inside)!r}, "w").write("gone"))
            if x:
                done += attempt(lambda: open({str(bashrc)!r}, "a").close())  # opens; changes nothing
            return done
    ''')
    try:
        result, _ = graded(program, "assert f(1) >= 1\n")
        assert result.passed == 0 and "returned 0" in result.message
        assert victim.read_text() == "keep me" and inside.read_text() in ("keep me", "keep me too")
        assert not marker.exists()
        assert (hashlib.sha256(bashrc.read_bytes()).hexdigest() if bashrc.exists() else None) == before
        control, _ = graded(program, "assert f(0) >= 1\n", sandbox="unsafe-process")
        assert control.passed == 1 and marker.exists() and not victim.exists()  # the attack works uncontained
    finally:
        if inside != victim:
            inside.unlink(missing_ok=True)


def test_no_network_not_even_the_hosts_loopback():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]

    def serve():
        for _ in range(2):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"secret")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    program = textwrap.dedent(f'''
        import socket
        def f(x):
            try:
                with socket.create_connection(("127.0.0.1", {port}), timeout=1) as conn:
                    return conn.recv(6)
            except OSError as err:
                return type(err).__name__
    ''')
    try:
        result, _ = graded(program, "assert f(0) == b'secret'\n")
        control, _ = graded(program, "assert f(0) == b'secret'\n", sandbox="unsafe-process")
    finally:
        server.close()
    assert result.passed == 0 and "Error" in result.message
    assert control.passed == 1


def test_ptrace_cannot_reach_the_grader():
    program = textwrap.dedent(f'''
        import ctypes, os
        def f(x):
            libc = ctypes.CDLL(None, use_errno=True)
            return [libc.ptrace(16, {os.getpid()}, 0, 0)]  # PTRACE_ATTACH to the grader
    ''')
    result, _ = graded(program, "assert f(0)[0] == 0\n")
    assert result.passed == 0 and "returned [-1" in result.message
    assert Path(f"/proc/{os.getpid()}/status").read_text().count("TracerPid:\t0") == 1


# --------------------------------------------------------------------------- processes, pipes, output


def test_a_thousand_children_are_all_gone_after_grading():
    token = "sspo" + secrets.token_hex(5)
    program = WRONG + textwrap.dedent(f'''
        import os, time
        for _ in range(1000):
            try:
                if os.fork() == 0:
                    open("/proc/self/comm", "w").write("{token}")
                    time.sleep(1000)
            except OSError:
                break
    ''')
    result, seconds = graded(program, timeout_s=4.0)
    assert result.passed == 0 and seconds < 4.0 + MARGIN_S
    assert no_survivors(token)


@pytest.mark.parametrize("tail", ["", "os.kill(os.getppid(), 9)"])
def test_setsid_daemons_holding_the_pipes_neither_survive_nor_stall_grading(tail):
    token = "sspo" + secrets.token_hex(5)
    program = WRONG + textwrap.dedent(f'''
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # the daemon keeps every descriptor, the result channel included
                open("/proc/self/comm", "w").write("{token}")
                time.sleep(1000)
            os._exit(0)
        time.sleep(0.2)
        {tail}
    ''')
    result, seconds = graded(program, timeout_s=1.0)
    assert result.passed == 0 and seconds < 1.0 + MARGIN_S
    assert no_survivors(token)


def test_raising_in_del_earns_nothing():
    program = textwrap.dedent('''
        import os
        class Bomb:
            def __del__(self):
                for fd in range(3, 16):
                    try:
                        os.write(fd, b"V 0 2\\nV 1 4\\nD\\n")
                    except OSError:
                        pass
                raise SystemExit(0)
        keep = Bomb()
        def f(x):
            Bomb()
            return Bomb()
    ''')
    result, seconds = graded(program)
    assert result.passed == 0 and result.status != "ok"  # a forged value and the real reply: two answers, void
    assert seconds < TIMEOUT_S + MARGIN_S


def test_values_made_to_choke_the_grader_fail_in_bounded_time():
    # huge, deeply nested and endlessly signed literals, sent as forged replies and returned as values
    program = textwrap.dedent('''
        import os
        junk = [b"V 0 " + b"-" * 500000 + b"1", b"V 1 " + b"[" * 100000, b"V 2 " + b"1+" * 30000 + b"1",
                b"V 0 " + b"9" * 5000]
        for fd in range(3, 16):
            for line in junk:
                try:
                    os.write(fd, line + b"\\n")
                except OSError:
                    pass
        def f(x):
            return list(range(10 ** 6))
    ''')
    result, seconds = graded(program)
    assert result.passed == 0 and seconds < TIMEOUT_S + MARGIN_S


def test_a_gigabyte_of_output_is_cut_off_in_bounded_time():
    program = WRONG + textwrap.dedent('''
        import os
        chunk = b"V 0 0\\n" * (1 << 17)
        for _ in range((1 << 30) // len(chunk)):
            for fd in (1, 2, 3, 4, 5):
                try:
                    os.write(fd, chunk)
                except OSError:
                    pass
        print("x" * (1 << 20))
    ''')
    result, seconds = graded(program, timeout_s=3.0)
    assert result.passed == 0 and seconds < 3.0 + MARGIN_S


def test_code_task_grades_correct_wrong_looping_hungry_and_forking_solutions(tmp_path):
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 5) == 5\nassert add(-1, 1) == 0\n"
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "Write add(a, b).", "tests": tests}) + "\n")
    task = CodeTask(path=str(path), timeout_s=2.0, memory_mb=128)
    token = "sspo" + secrets.token_hex(5)
    fork = (f"import os, time\nif os.fork() == 0:\n    open('/proc/self/comm', 'w').write('{token}')\n"
            "    time.sleep(1000)\n")
    bodies = ["return a + b", "return a * b", "while True:\n        pass", "return len([0] * 10**9)", "return a + b"]
    completions = [f"Here:\n```python\n{fork if i == 4 else ''}def add(a, b):\n    {body}\n```" for i, body in
                   enumerate(bodies)]
    _, answers = task.sample(np.random.default_rng(0), 5)
    start = time.monotonic()
    rewards = task.rewards(completions, answers, workers=5)
    assert time.monotonic() - start < 2.0 + 2 * MARGIN_S
    # a * b equals a + b at (2, 2) only; the loop and the hog earn nothing; the forker is correct
    assert rewards == [1.0, 0.25, 0.0, 0.0, 1.0]
    assert no_survivors(token)
    strict = CodeTask(path=str(path), grader="tests-all")
    assert strict.rewards(completions[:2], answers[:2]) == [1.0, 0.0]
