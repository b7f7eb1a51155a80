"""The sandbox (sspo_analysis/sandbox/), the code and synthesis tasks, and the engine reward functions.

Oracles are independent of the code under test: expected test counts are worked
out by hand or with plain Python on our own (trusted) functions, process
survival is read from ``/proc`` (pid plus start time, so a reused pid does not
count), and stray files from a listing of the system temporary directory.
"""

import importlib.util
import json
import math
import os
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sspo_analysis import sandbox
from sspo_analysis.sandbox import SandboxResult, extract_code, grade_many, parse_tests, run_python
from sspo_analysis.training.tasks import CodeTask, Synthesis, make_task

TESTS = "assert f(1) == 2\nassert f(2) == 4\nassert f(3) == 6\n"
DOUBLE = "def f(x):\n    return 2 * x\n"
MARGIN_S = 4.0  # start-up and clean-up on a loaded 2-core machine


def alive(pid: int, start: str) -> bool:
    """True if the process ``pid`` that started at ``start`` (clock ticks since boot) still runs (not a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] not in ("Z", "X")


# --------------------------------------------------------------------------- outcomes


def test_correct_program_passes_every_test():
    assert run_python(DOUBLE, TESTS) == SandboxResult(3, 3, "ok", "3/3 passed")


def test_wrong_program_fails_with_the_failing_test_named():
    result = run_python("def f(x):\n    return x + 1\n", TESTS)  # x + 1 == 2x only at x = 1
    assert (result.passed, result.total, result.status) == (1, 3, "failed")
    assert "assert f(2) == 4" in result.message
    assert result.fraction == pytest.approx(1 / 3)


def test_syntax_error_is_reported_as_syntax():
    result = run_python("def f(x) return x\n", TESTS)
    assert (result.passed, result.status) == (0, "syntax")
    assert "SyntaxError" in result.message


def test_infinite_loop_times_out_within_the_limit_plus_a_margin():
    start = time.monotonic()
    result = run_python("def f(x):\n    while True:\n        pass\n", TESTS, timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and result.passed == 0
    assert 1.0 <= elapsed < 1.0 + MARGIN_S


def test_sleeping_program_times_out_on_the_wall_clock():
    start = time.monotonic()
    result = run_python("import time\ntime.sleep(60)\n", TESTS, timeout_s=1.0)
    assert result.status == "timeout" and time.monotonic() - start < 1.0 + MARGIN_S


def test_allocation_loop_is_reported_as_memory():
    program = "def f(x):\n    hog = []\n    while True:\n        hog.append(bytearray(10**6))\n"
    result = run_python(program, TESTS, memory_mb=128)
    assert result.status == "memory"


def test_exceptions_exit_and_oversized_files():
    assert run_python("raise ValueError('at import')\n", TESTS).status == "crashed"
    assert run_python("import os\nos._exit(3)\n", TESTS).message.endswith("(exit code 3) after 0 passed")
    big = "with open('big', 'wb') as fh:\n    fh.write(bytes(4 << 20))\n"
    assert run_python(big, TESTS, max_file_mb=1).status == "crashed"  # SIGXFSZ
    exits = run_python(DOUBLE + "import sys\nsys.exit(0)\n", TESTS)  # SystemExit at import is an error
    assert exits.status == "crashed" and "SystemExit" in exits.message


def test_tests_that_pass_before_a_timeout_still_count():
    program = "def f(x):\n    while x == 3:\n        pass\n    return 2 * x\n"
    result = run_python(program, TESTS, timeout_s=1.0)
    assert (result.passed, result.status) == (2, "timeout")


def test_program_output_cannot_forge_test_results():
    program = DOUBLE.replace("2 * x", "x") + "print('P 0')\nprint('P 1')\nprint('P 2')\nprint('D')\n"
    result = run_python(program, TESTS)  # f(x) = x passes no test; its stdout goes nowhere
    assert (result.passed, result.status) == (0, "failed")


# --------------------------------------------------------------------------- processes and files


FORKER = textwrap.dedent('''
    import os, subprocess, sys, time

    LOG = {log!r}

    def record(tag, pid):
        with open(f"/proc/{{pid}}/stat") as fh:
            start = fh.read().rsplit(")", 1)[1].split()[19]
        with open(LOG, "a") as fh:
            fh.write(f"{{tag}} {{pid}} {{start}}\\n")

    if os.fork() == 0:          # a plain child that ignores SIGTERM
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record("group", os.getpid())
        time.sleep(1000)
    if os.fork() == 0:          # a daemon: double fork, setsid, the middle process exits
        os.setsid()
        if os.fork() == 0:
            record("daemon", os.getpid())
            time.sleep(1000)
        os._exit(0)
    if os.fork() == 0:          # a child in its own process group
        os.setpgid(0, 0)
        record("pgroup", os.getpid())
        time.sleep(1000)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"], start_new_session=True)
    record("session", sleeper.pid)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if len(open(LOG).read().splitlines()) >= 4:
                break
        except OSError:
            pass
        time.sleep(0.01)
    {tail}

    def f(x):
        return 2 * x
''')


@pytest.mark.filterwarnings("ignore:sandbox 'unsafe-process'")
@pytest.mark.parametrize("tail, status", [("", "ok"), ("time.sleep(1000)", "timeout"),
                                          ("os.kill(os.getppid(), 9); time.sleep(1000)", "crashed")])
def test_the_fallbacks_reaper_leaves_no_children_daemons_or_process_groups(tmp_path, tail, status):
    # sandbox="unsafe-process": no PID namespace, so the harness's reaper is what kills descendants (the bwrap
    # sandbox's PID namespace is tested with hostile programs in test_sandbox_hostile.py)
    log = tmp_path / "pids.txt"
    result = run_python(FORKER.format(log=str(log), tail=tail), TESTS, timeout_s=5.0, sandbox="unsafe-process")
    assert result.status == status
    procs = {tag: (int(pid), start) for tag, pid, start in (line.split() for line in log.read_text().splitlines())}
    assert set(procs) == {"group", "daemon", "pgroup", "session"}
    time.sleep(0.2)  # the last SIGKILLs are delivered asynchronously
    survivors = {tag for tag, (pid, start) in procs.items() if alive(pid, start)}
    for tag in survivors:
        os.kill(procs[tag][0], 9)
    if status == "crashed":
        # the program killed its reaper: the library kills the worker's process group; what left the group
        # can escape (documented), but the worker's group itself is gone
        assert "group" not in survivors
    else:
        assert not survivors


@pytest.mark.filterwarnings("ignore:sandbox 'unsafe-process'")
def test_the_fallbacks_relative_writes_leave_nothing_behind(tmp_path):
    before = set(os.listdir(tempfile.gettempdir()))
    where = tmp_path / "cwd.txt"
    program = textwrap.dedent(f'''
        import os, tempfile
        open({str(where)!r}, "w").write(os.getcwd())
        open("out.txt", "w").write("x" * 1000)
        os.makedirs("a/b/c")
        open("a/b/c/deep.txt", "w").write("deep")
        tempfile.NamedTemporaryFile(delete=False).write(b"temp")
        tempfile.mkdtemp()
        os.chmod("a/b", 0)
        os.symlink("/", "root-link")
        def f(x):
            return 2 * x
    ''')
    assert run_python(program, TESTS, sandbox="unsafe-process").status == "ok"
    workdir = Path(where.read_text())
    assert not workdir.exists()
    assert Path("/").exists() and os.listdir("/")  # the symlink was removed, not followed
    new = {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith(("sspo-sandbox-", "tmp"))}
    assert not new


# --------------------------------------------------------------------------- determinism and parallelism


PROGRAMS = st.one_of(
    st.tuples(st.integers(-3, 3), st.integers(-3, 3)).map(lambda ab: ("affine", ab)),
    st.sampled_from([("syntax", None), ("raise", None), ("exit", None)]),
)


def _source(kind, params):
    if kind == "affine":
        return f"def f(x):\n    return {params[0]} * x + {params[1]}\n"
    others = {"syntax": "def f(x:\n", "raise": "def f(x):\n    raise KeyError(x)\n", "exit": "import os\nos._exit(1)\n"}
    return others[kind]


@settings(max_examples=8, deadline=None)
@given(PROGRAMS)
def test_grading_the_same_program_twice_gives_the_same_result(case):
    kind, params = case
    first, second = run_python(_source(kind, params), TESTS), run_python(_source(kind, params), TESTS)
    assert first == second
    if kind == "affine":  # oracle: which of f(1)=2, f(2)=4, f(3)=6 the line a*x+b meets
        a, b = params
        assert first.passed == sum(a * x + b == 2 * x for x in (1, 2, 3))


def test_grade_many_keeps_order_and_a_slow_program_does_not_block_the_rest():
    programs = ["def f(x):\n    while True:\n        pass\n"] + [f"def f(x):\n    return {k} * x\n" for k in range(6)]
    start = time.monotonic()
    results = grade_many(programs, TESTS, workers=2, timeout_s=2.0)
    assert time.monotonic() - start < 2.0 + 2 * MARGIN_S
    assert [r.status for r in results] == ["timeout"] + ["ok" if k == 2 else "failed" for k in range(6)]
    bad = grade_many([DOUBLE], ["not python ("])[0]
    assert bad.status == "crashed" and "grader error" in bad.message


# --------------------------------------------------------------------------- parsing helpers


def test_parse_tests_reads_asserts_test_functions_and_check_into_calls():
    source = "import math\nassert f(1) == 1\ndef test_two():\n    assert f(2) == 4\n    assert f(-2) == 4\nx = 3\n" \
             "assert f(x) == 9\n"
    plan = parse_tests(source)
    assert [t.source for t in plan.tests] == ["assert f(1) == 1", "test_two()", "assert f(x) == 9"]
    assert [(c.name, c.args, c.kwargs) for c in plan.calls] == [("f", "(1,)", "{}"), ("f", "(2,)", "{}"),
                                                                ("f", "(-2,)", "{}"), ("f", "(3,)", "{}")]
    humaneval = parse_tests("def check(candidate):\n    assert candidate(2) == 4\n", "square")
    assert [t.source for t in humaneval.tests] == ["check(candidate)"] and humaneval.functions == ("square",)
    called = parse_tests("def check(candidate):\n    assert candidate(2) == 4\ncheck(square)\n")
    assert called.functions == ("square",) and len(called.tests) == 1
    with pytest.raises(ValueError, match="no test found"):
        parse_tests("x = 1\n")
    with pytest.raises(ValueError, match="tests: not valid Python"):
        parse_tests("assert (\n")


GOOD = textwrap.dedent("""
    import math
    def f(x):
        return x * x
    def g(items):
        return sorted(set(items))
    def h(s):
        return None
    def t():
        return (1, [2, {3: b"x"}], {4}, None, 1.5, -2j, "\\n")
    def k():
        return math.nan
""")
BAD = GOOD.replace("x * x", "x * x + 1").replace("sorted(set(items))", "list(items)") \
    .replace("return None", "return 0").replace("-2j", "2j").replace("math.nan", "0.0")
FORMS = ["assert f(2) == 4", "assert 4 == f(2)", "assert abs(f(0.5) - 0.25) < 1e-9",
         "assert math.isclose(f(1.5), 2.25, rel_tol=1e-9)", "assert isclose(f(3), 9)",
         "assert set(g([3, 1, 3])) == {1, 3}", "assert sorted(g([3, 1])) == [1, 3]", "assert h('a') is None",
         "assert f(2) in (4, 5)", "assert len(g([1, 2, 2])) == 2", "assert f(x=3) == 9",
         "r = f(4)\nassert r == 16 and r > 15", "assert g((2, 1))[0] == 1", "assert isinstance(h(1), type(None))",
         "assert not h('b')", "assert f(2) != 5", "assert t() == (1, [2, {3: b'x'}], {4}, None, 1.5, -2j, '\\n')",
         "assert f(1e200) == float('inf')", "assert math.isnan(k())", "assert f(2) + f(3) == 13"]


@pytest.mark.parametrize("program", [GOOD, BAD])
def test_every_understood_test_form_agrees_with_python_itself(program):
    # oracle: the same asserts run by Python in this process against the same (trusted) functions
    expected = 0
    for form in FORMS:
        scope = {"isclose": math.isclose}
        exec(program, scope)
        try:
            exec(form, scope)
            expected += 1
        except AssertionError:
            pass
    result = run_python(program, "from math import isclose\n" + "\n".join(FORMS) + "\n")
    assert (result.passed, result.total) == (expected, len(FORMS))
    assert (expected == len(FORMS)) == (program is GOOD) and expected >= 5  # both outcomes are exercised


@pytest.mark.parametrize("tests, why", [
    ("for i in range(3):\n    assert f(i) == i\n", "line 1: `for i in range.*`: For statements are not supported"),
    ("def helper():\n    return 1\nassert f(1) == helper()\n", "line 1: .*FunctionDef statements"),
    ("assert f(g(1)) == 2\n", "the arguments of f\\(\\) use the program's values"),
    ("assert f(1).real == 1\n", "f\\(1\\).real is not supported"),
    ("assert f(lambda: 1) == 2\n", "Lambda expressions are not supported"),
    ("assert f(1, [2], {3: (4, 5)}, None, x=-1.5) == 2\nassert f(float('nan')) == 1\n", "line 2: .*cannot be sent"),
    ("assert f(1) == y\n", "name 'y' is not bound"),
    ("assert f(*[1]) == 2\n", "\\*args"),
    ("x = [1]\nassert x == [1, 2]\n", "line 2: .* is false whatever the program does"),
    ("assert max([1, 2]) == 2\n", "line 1: .*calls only builtins the grader applies itself"),
    ("assert f(1) == 1\nassert f(2) == [i for i in (1,)]\n", "line 2: .*ListComp expressions are not supported"),
    ("def check(candidate):\n    assert candidate(1)\n    while True:\n        pass\n",
     "line 3: `while True:`: While statements"),
])
def test_tests_the_grader_cannot_read_are_refused_with_the_line(tests, why):
    with pytest.raises(ValueError, match=why):
        parse_tests(tests, "f")


def test_entry_point_and_humaneval_check():
    tests = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
    assert run_python("def square(v):\n    return v * v\n", tests, entry_point="square").status == "ok"
    missing = run_python("def cube(v):\n    return v ** 3\n", tests, entry_point="square")
    assert missing.status == "crashed" and "entry point" in missing.message


def test_extract_code_takes_the_last_fenced_block():
    text = "Try:\n```python\nx = 1\n```\nbetter:\n~~~\ny = 2\n~~~\n"
    assert extract_code(text) == "y = 2"
    assert extract_code("no fences here") == "no fences here"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # truncated


# --------------------------------------------------------------------------- tasks


def _code_file(tmp_path, records):
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_code_task_file_errors_name_the_file_and_line(tmp_path):
    path = _code_file(tmp_path, [{"prompt": "p", "tests": "assert True"}, {"prompt": "p"}])
    with pytest.raises(ValueError, match=r"code.jsonl:2: needs string fields 'prompt' and 'tests'"):
        CodeTask(path=str(path))
    path.write_text('{"prompt": "p", "tests": "x = 1"}\n')
    with pytest.raises(ValueError, match=r"code.jsonl:1: tests: no test found"):
        CodeTask(path=str(path))
    with pytest.raises(ValueError, match="task.grader: unknown value 'exact' for task 'code'"):
        CodeTask(path=str(path), grader="exact")


def test_synthesis_rewards_come_from_the_sandbox_not_eval():
    task = Synthesis()
    prompts, answers = task.sample(np.random.default_rng(1), 64)
    assert not any(" " in p for p in prompts)  # a reloaded character tokenizer drops spaces
    for prompt, answer in zip(prompts, answers):  # the prompt shows f(0), f(1), f(2) of the hidden function
        values = [int(part.split("=")[1]) for part in prompt.rstrip(":").split(",")]
        slope, offset = values[1] - values[0], values[0]
        expected = (f"{slope}*x" if slope > 1 else "x") + (f"+{offset}" if offset else "")
        square = values[2] - 2 * values[1] + values[0] == 2  # second difference of x*x
        assert answer == (f"x*x+{offset}" if offset else "x*x") if square else answer == expected
        assert len(answer) <= 5
    assert task.rewards(answers[:8], answers[:8]) == [1.0] * 8
    assert task.reward("x*3+0", "3*x") == 1.0 and task.reward("3*x+1", "3*x") == 0.0
    assert task.reward("__import__('os')", "x") == 0.0  # filtered: never run
    assert task.reward("(x", "x") == 0.0


def test_a_raising_grader_gives_zero_and_is_counted(monkeypatch):
    task = Synthesis()
    real = sandbox.run_python

    def flaky(program, tests, **kwargs):
        if "7" in program:
            raise RuntimeError("grader exploded")
        return real(program, tests, **kwargs)

    monkeypatch.setattr(sandbox, "run_python", flaky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewards = task.rewards(["x+7", "x+2", "x+7"], ["x+2", "x+2", "x+7"])
    assert rewards == [0.0, 1.0, 0.0] and task.reward_failures >= 1
    assert any("grading failed" in str(w.message) for w in caught)
    assert task.reward("x", "not a reference") == 0.0  # a bad reference: 0, counted
    assert task.reward_failures >= 2


def test_repeated_completions_are_graded_once(monkeypatch):
    task, calls = Synthesis(), []
    real = sandbox.run_python
    monkeypatch.setattr(sandbox, "run_python", lambda program, tests, **kw: calls.append(program) or
                        real(program, tests, **kw))
    assert task.rewards(["x+1", "x+1", "x+2"], ["x+1", "x+1", "x+1"]) == [1.0, 1.0, 0.0]
    assert task.reward("x+1", "x+1") == 1.0 and task.reward("x+2", "x+1") == 0.0
    assert len(calls) == 2  # "x+1" and "x+2" against the tests of x+1, once each


def test_trainer_keeps_going_when_rewards_raise(tmp_path, monkeypatch, one_thread):
    from sspo_analysis.training import read_metrics, train

    calls = {"n": 0}
    original = Synthesis.program

    def sometimes_raises(self, completion, answer):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("reward exploded")
        return original(self, "x", answer)  # a valid program, so the sandbox runs too

    monkeypatch.setattr(Synthesis, "program", sometimes_raises)
    over = ['task.name="synthesis"', 'model.preset="micro"', "model.warm_start=false", "steps=2",
            "rollout.prompts=2", "rollout.group_size=2", "log.progress=false", "log.entropy_taylor=false"]
    run = train(None, tmp_path / "run", overrides=over)
    df = read_metrics(run)
    assert len(df) == 2 and calls["n"] >= 8 and np.isfinite(df.reward_mean).all()


def test_config_fields_of_the_new_tasks(tmp_path):
    from sspo_analysis.training.config import load_config
    from sspo_analysis.training.tasks import make_task_from

    cfg = load_config(None, ['task.name="synthesis"'])
    assert isinstance(make_task_from(cfg), Synthesis) and make_task_from(cfg).grader == "tests-all"
    with pytest.raises(ValueError, match="task.grader: unknown value 'exact'; allowed values: tests-fraction"):
        load_config(None, ['task.name="synthesis"', 'task.grader="exact"'])
    with pytest.raises(ValueError, match="task.sandbox_timeout_s"):
        load_config(None, ["task.sandbox_timeout_s=0"])
    with pytest.raises(ValueError, match="task.path"):
        load_config(None, ['task.name="code"'])
    path = _code_file(tmp_path, [{"prompt": "p", "tests": "assert True"}])
    code = make_task_from(load_config(None, ['task.name="code"', f'task.path="{path}"']))
    assert isinstance(code, CodeTask) and code.grader == "tests-fraction"
    assert make_task("jsonl", path=str(path), grader="", answer_key="tests").grader == "exact"


# --------------------------------------------------------------------------- engines


def test_verl_compute_score():
    from sspo_analysis.integrations.rewards import compute_score

    solution = "Sure.\n```python\ndef add(a, b):\n    return a + b\n```"
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"
    assert compute_score("code", solution, tests) == 1.0
    assert compute_score("code", solution.replace("a + b", "a * b"), {"tests": tests}) == 0.5
    assert compute_score("code", solution.replace("a + b", "a * b"), json.dumps({"tests": tests}),
                         {"grader": "tests-all"}) == 0.0
    with pytest.warns(RuntimeWarning, match="grading failed"):
        assert compute_score("code", solution, {"no": "tests"}) == 0.0


def test_verl_loads_compute_score_by_path_without_verl():
    import subprocess
    import sys

    import sspo_analysis.integrations.rewards as rewards

    # what verl's custom_reward_function does: load the file by path, take the function by name
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('custom_module', {rewards.__file__!r})\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "score = module.compute_score('d', 'def f():\\n    return 1', 'assert f() == 1')\n"
            "print(score, 'verl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1.0", "False"], out.stderr[-2000:]


def test_trl_code_reward_direct_call():
    trl = pytest.importorskip("sspo_analysis.integrations.trl")

    completions = [[{"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}],
                   "def add(a, b):\n    return a - b\n"]
    tests = ["assert add(1, 2) == 3\nassert add(2, 2) == 4\n"] * 2
    assert trl.code_reward(prompts=["p", "p"], completions=completions, tests=tests) == [1.0, 0.0]
    with pytest.raises(ValueError, match="data set column 'tests'"):
        trl.code_reward(prompts=["p"], completions=["x"])


@pytest.mark.trl
def test_trl_code_reward_in_a_three_step_grpo_run(tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from sspo_analysis.integrations.trl import code_reward

    # the model of the project's TRL end-to-end test (examples/trl_sspo_tiny.py): the micro preset, saved
    example = Path(__file__).resolve().parents[1] / "examples" / "trl_sspo_tiny.py"
    spec = importlib.util.spec_from_file_location("trl_sspo_tiny", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_dir = str(tmp_path / "model")
    module.build_model(model_dir)
    seen = []

    def recorded(prompts, completions, **kwargs):
        rewards = code_reward(prompts=prompts, completions=completions, **kwargs)
        seen.extend(zip(completions, rewards))
        return rewards

    recorded.__name__ = "code_reward"
    rows = {"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)], "tests": ["assert True\n"] * 16}
    config = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=8, learning_rate=3e-3, logging_steps=1,
                        report_to="none", save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=recorded, args=config,
                          train_dataset=datasets.Dataset.from_dict(rows),
                          processing_class=AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/code_reward/mean" in h]
    assert len(logged) == 3 and len(seen) >= 12
    for completion, reward in seen:  # oracle: `assert True` passes exactly when the program compiles and runs
        try:
            compile(completion, "c", "exec")
        except (SyntaxError, ValueError):
            assert reward == 0.0
        else:
            assert reward in (0.0, 1.0)


# --------------------------------------------------------------------------- which sandbox


def test_a_missing_bubblewrap_is_said_once_and_refused_without_opt_in(monkeypatch, tmp_path):
    from sspo_analysis.integrations.rewards import compute_score, make_code_reward
    from sspo_analysis.training.config import load_config
    from sspo_analysis.training.tasks import make_task_from

    monkeypatch.setenv("PATH", str(tmp_path))  # the real probe, on a PATH without bwrap
    assert sandbox.bwrap_problem.__wrapped__() == "the bwrap command is not on PATH"
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "the bwrap command is not on PATH")
    with pytest.raises(sandbox.SandboxUnavailable, match="install it .*unsafe-process"):
        run_python(DOUBLE, TESTS)
    with pytest.raises(sandbox.SandboxUnavailable):
        grade_many([DOUBLE, DOUBLE], TESTS)  # for the batch, not as two zero rewards
    with pytest.raises(sandbox.SandboxUnavailable):
        compute_score("code", DOUBLE, TESTS)
    with pytest.raises(sandbox.SandboxUnavailable):
        make_code_reward()(completions=[DOUBLE], tests=[TESTS])
    with pytest.raises(ValueError, match="task.sandbox: bubblewrap .*cannot run here .*unsafe-process"):
        make_task_from(load_config(None, ['task.name="synthesis"']))
    with pytest.raises(ValueError, match="task.sandbox: unknown value 'docker'; allowed values: bwrap, unsafe-process"):
        load_config(None, ['task.sandbox="docker"'])
    sandbox._warn_unsafe.cache_clear()
    with pytest.warns(RuntimeWarning, match="without file-system, network or process isolation"):
        assert run_python(DOUBLE, TESTS, sandbox="unsafe-process").status == "ok"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        task = make_task_from(load_config(None, ['task.name="synthesis"', 'task.sandbox="unsafe-process"']))
        assert task.rewards(["2*x+1"], ["2*x+1"]) == [1.0]


def test_code_task_alphabet_check_reads_the_functions_the_model_writes(tmp_path):
    from sspo_analysis.training.inputs import check_alphabet
    from sspo_analysis.training.models import CHARS

    tests = "assert add(1, 2) == 3\nassert add(0, 0) == 0"
    task = CodeTask(path=str(_code_file(tmp_path, [{"prompt": "Write add(a, b).", "tests": tests}])))
    assert task.written(task.answers[0]) == "def add(): return"
    check_alphabet(task, CHARS, "task.path")  # was refused: the JSON of the tests holds { } " and a newline
    humaneval = _code_file(tmp_path, [{"prompt": "p", "entry_point": "has_close_elements",
                                       "tests": "def check(candidate):\n    assert candidate([1.0], 0.5) is False\n"}])
    with pytest.raises(ValueError, match=r"1 of 1 answers use characters .*'_' x2"):
        check_alphabet(CodeTask(path=str(humaneval)), CHARS, "task.path")


def test_code_task_trains_with_the_character_tokenizer(tmp_path, one_thread):
    from sspo_analysis.training import read_metrics, train

    # the report: refused because the alphabet check read the JSON-encoded tests
    path = _code_file(tmp_path, [{"prompt": "add(a,b)=", "tests": "assert add(1, 2) == 3\nassert add(0, 0) == 0"}])
    over = ['task.name="code"', f'task.path="{path}"', 'model.preset="micro"', "model.warm_start=false", "steps=1",
            "rollout.prompts=2", "rollout.group_size=2", "log.progress=false", "log.entropy_taylor=false",
            "task.sandbox_timeout_s=1.0"]
    df = read_metrics(train(None, tmp_path / "run", overrides=over))
    assert len(df) == 1 and df.reward_mean.iloc[0] == 0.0  # an untrained model writes no add(): reward 0
