"""Tests read in the grader: the calls a program must answer, and the checks made on its answers here.

A test never runs next to the program. :func:`parse_tests` reads the test source with :mod:`ast` in
the grader's process and turns each test (a top-level ``assert``, a ``test_*`` function, or
HumanEval's ``check(candidate)`` with an entry point) into

- the *calls* it makes of the program's functions: a name and literal arguments, which the sandbox
  makes and answers with each call's value as plain data (a Python literal of builtin types,
  decoded by ``harness.decode``), and
- its *checks*: the assert expressions, evaluated here by a small interpreter (:func:`verdict`) on
  those values. Expected values and comparisons never enter the program's process.

Understood: literals (numbers, strings, bytes, tuples, lists, dicts, sets, None, True, False), names
bound to them (``x = [1, 2]``) or to a call (``r = f(3)``), comparisons (``== != < <= > >= in
not in``; ``is``/``is not`` with None, True or False), ``and or not``, arithmetic on numbers,
indexing, and a few pure builtins (abs, len, sorted, set, isinstance, ..., ``math.isclose``), so
that ``assert f(1) == 2``, ``assert abs(f(x) - 0.5) < 1e-6``, ``assert math.isclose(f(2), 1.41,
rel_tol=1e-3)``, ``assert set(f([1, 2])) == {1, 2}`` and ``assert f("a") is None`` are graded.
Anything else (loops, helper functions, method calls, a program function passed as an argument) is
refused by :func:`parse_tests` with the line and the reason, never run.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Any

SAFE_FUNCTIONS: dict[str, Any] = {f.__name__: f for f in (
    abs, all, any, bool, dict, float, frozenset, int, isinstance, len, list, max, min, round, set, sorted, str,
    sum, tuple, type)}
"""Builtins a test may apply to values in the grader (pure, and bounded by their arguments' size)."""
MATH: dict[str, Any] = {name: getattr(math, name) for name in (
    "isclose", "isnan", "isinf", "isfinite", "fabs", "sqrt", "floor", "ceil", "pi", "e", "tau", "inf", "nan")}
"""``math.<name>`` (and ``isclose`` imported from math) understood in tests."""
MAX_POWER_BITS = 1 << 16

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_NUMBER = (int, float, complex)
_SEQUENCE = (str, bytes, list, tuple)


class TestsError(ValueError):
    """Test source the grader cannot read into calls and checks (the message names the line)."""


@dataclass(frozen=True)
class Call:
    """One call of a program function: ``name(*args, **kwargs)``, arguments as Python literals."""

    name: str
    args: str
    kwargs: str


@dataclass(frozen=True)
class Test:
    """One test: it passes when the program loaded and every check is true of the calls' values."""

    source: str
    checks: tuple[tuple[ast.expr, dict], ...]  # (expression, the names bound where it stands)
    calls: tuple[int, ...]  # the calls its checks use, in order


@dataclass(frozen=True)
class Plan:
    """The tests of one test source, the calls they need, and the program functions they call."""

    tests: tuple[Test, ...]
    calls: tuple[Call, ...]
    functions: tuple[str, ...]


class Unanswered(Exception):
    """A call the program did not answer with a value."""


@dataclass
class _Reader:
    """Reads statements into tests, registering each call of a program function once."""

    calls: list[Call] = field(default_factory=list)

    def call_of(self, node: ast.Call, scope: dict, aliases: dict[str, str]) -> None:
        """Register ``node`` (a call of a program function) with its literal arguments."""
        name = node.func.id
        name = aliases.get(name, name)
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise TestsError("*args and **kwargs in a call of the program are not supported")
        for arg in node.args + [k.value for k in node.keywords]:
            self.expression(arg, scope, aliases)
        try:
            args = tuple(evaluate_node(a, scope, None) for a in node.args)
            kwargs = {k.arg: evaluate_node(k.value, scope, None) for k in node.keywords}
        except Unanswered:
            raise TestsError(f"the arguments of {name}() use the program's values; only literals can be sent") from None
        except Exception as err:  # noqa: BLE001 - any failure of a literal is a test we cannot read
            raise TestsError(f"the arguments of {name}() are not literals the grader can evaluate ({err})") from None
        text_args, text_kwargs = repr(args), repr(kwargs)
        try:  # what the sandbox will decode must be what the test meant
            same = ast.literal_eval(text_args) == args and ast.literal_eval(text_kwargs) == kwargs
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            same = False
        if not same:
            raise TestsError(f"the arguments of {name}() cannot be sent as plain data")
        node.sandbox_call = len(self.calls)  # the evaluator looks the value up by this index
        self.calls.append(Call(name, text_args, text_kwargs))

    def expression(self, node: ast.expr, scope: dict, aliases: dict[str, str]) -> None:
        """Check that ``node`` is understood and register its program calls (in evaluation order)."""
        if isinstance(node, ast.Call):
            func = node.func
            program = isinstance(func, ast.Name) and func.id not in scope and (
                func.id in aliases or func.id not in SAFE_FUNCTIONS and func.id != "isclose")
            if program:
                return self.call_of(node, scope, aliases)
            if not (isinstance(func, ast.Name) and func.id in scope) and _function(func) is not None:
                for child in node.args + [k.value for k in node.keywords]:
                    self.expression(child, scope, aliases)
                return None
            raise TestsError(f"{ast.unparse(func)}() is neither a function of the program nor a builtin the grader "
                             "applies (abs, len, sorted, set, isinstance, math.isclose, ...)")
        if isinstance(node, ast.Name) and node.id not in scope and node.id not in SAFE_FUNCTIONS:
            raise TestsError(f"name {node.id!r} is not bound to a literal or a call in the tests")
        if isinstance(node, ast.Attribute):
            if _function(node) is None:
                raise TestsError(f"{ast.unparse(node)} is not supported (only math.<name>)")
            return None
        if not isinstance(node, _ALLOWED):
            raise TestsError(f"{type(node).__name__} expressions are not supported")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expression(child, scope, aliases)
        return None

    def body(self, statements: list[ast.stmt], scope: dict, aliases: dict[str, str]) -> list[tuple[ast.expr, dict]]:
        """The checks of a test function's (or check's) body; assignments bind names in ``scope``."""
        checks = []
        for stmt in statements:
            try:
                checks += self.statement(stmt, scope, aliases)
            except TestsError as err:
                err.statement = getattr(err, "statement", stmt)
                raise
        return checks

    def statement(self, stmt: ast.stmt, scope: dict, aliases: dict[str, str]) -> list[tuple[ast.expr, dict]]:
        """The checks of one statement inside a test (an assert), or none (an assignment, an import)."""
        if isinstance(stmt, ast.Assert):
            self.expression(stmt.test, scope, aliases)
            if not calls_used(stmt.test, scope):
                _constant_truth(stmt, scope)
                return []
            return [(stmt.test, dict(scope))]
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            self.expression(stmt.value, scope, aliases)
            scope[stmt.targets[0].id] = (stmt.value, dict(scope))
            return []
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Pass)) or _is_docstring(stmt):
            return []
        raise TestsError(f"{type(stmt).__name__} statements are not supported in tests")


def calls_used(node: ast.expr, scope: dict) -> list[int]:
    """The program calls an expression uses, directly or through names bound to them, in order."""
    found = []
    for sub in ast.walk(node):
        index = getattr(sub, "sandbox_call", None)
        if index is not None:
            found.append(index)
        elif isinstance(sub, ast.Name) and sub.id in scope:
            found += calls_used(*scope[sub.id])
    return sorted(set(found))


_ALLOWED = (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Name, ast.UnaryOp, ast.BinOp, ast.BoolOp,
            ast.Compare, ast.Subscript, ast.Slice)


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def _function(func: ast.expr) -> Any:
    """The builtin or math function (or constant) ``func`` names, or None."""
    if isinstance(func, ast.Name):
        return SAFE_FUNCTIONS.get(func.id, MATH["isclose"] if func.id == "isclose" else None)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "math":
        return MATH.get(func.attr)
    return None


def _constant_truth(stmt: ast.Assert, scope: dict) -> None:
    """An assert that calls no program function: refused when false (it could never pass) or when it calls a
    builtin (``assert max([1, 2]) == 2`` would test the grader's ``max``, not a ``max`` the program defines)."""
    if any(isinstance(sub, ast.Call) for sub in ast.walk(stmt.test)):
        raise TestsError("calls only builtins the grader applies itself, so it tests nothing of the program "
                         "(a program function named like a builtin is not supported)")
    try:
        value = bool(evaluate_node(stmt.test, scope, None))
    except Exception as err:  # noqa: BLE001
        raise TestsError(f"cannot be evaluated without the program ({err})") from None
    if not value:
        raise TestsError("is false whatever the program does (the grader cannot see what the program changes)")


def _where(node: ast.AST, err: Exception, tests: str) -> TestsError:
    source = (ast.get_source_segment(tests, node) or ast.unparse(node)).splitlines()[0][:80]
    return TestsError(f"tests: line {node.lineno}: `{source}`: {err}")


def parse_tests(tests: str, entry_point: str | None = None) -> Plan:
    """The tests of ``tests`` as a :class:`Plan`; :class:`TestsError` (a ValueError) naming the line if unreadable.

    Each top-level ``assert`` is one test; each top-level ``def test_*()`` is one test (all its
    asserts); with ``entry_point``, ``candidate`` is that function, and ``def check(candidate)``
    is one test when nothing else is (the HumanEval layout) or when called as ``check(name)``.
    """
    try:
        module = ast.parse(tests)
    except SyntaxError as err:
        raise TestsError(f"tests: not valid Python (line {err.lineno}: {err.msg})") from None
    reader = _Reader()
    aliases = {"candidate": entry_point} if entry_point else {}
    scope: dict = {}
    found: list[Test] = []
    check = None
    for stmt in module.body:
        try:
            if isinstance(stmt, ast.FunctionDef) and (stmt.name.startswith("test") or stmt.name == "check"):
                if stmt.name == "check":
                    check = stmt
                    continue
                found.append(_test(reader, stmt, stmt.body, dict(scope), aliases, tests))
            elif _is_check_call(stmt, check):
                found.append(_check_test(reader, check, stmt.value.args[0].id, scope, aliases, tests))
                check = None
            elif not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                      and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id.startswith("test")):
                found.append(_test(reader, stmt, [stmt], scope, aliases, tests, top_level=True))
        except TestsError as err:
            raise (err if str(err).startswith("tests:") else _where(stmt, err, tests)) from None
    found = [t for t in found if t is not None]
    if check is not None and entry_point and not found:
        found.append(_check_test(reader, check, entry_point, scope, aliases, tests))
    if not found:
        raise TestsError("tests: no test found; allowed: top-level assert statements, test_* functions, "
                         "or check(candidate) with an entry point")
    names = dict.fromkeys(c.name for c in reader.calls)
    return Plan(tuple(found), tuple(reader.calls), tuple(names))


def _is_check_call(stmt: ast.stmt, check: ast.FunctionDef | None) -> bool:
    """``check(name)`` at the top level, after ``def check(candidate)``."""
    return (check is not None and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "check"
            and len(stmt.value.args) == 1 and isinstance(stmt.value.args[0], ast.Name) and not stmt.value.keywords)


def _check_test(reader: _Reader, check: ast.FunctionDef, name: str, scope: dict, aliases: dict, tests: str) -> Test:
    """HumanEval's ``check(candidate)`` with ``candidate`` the program's function ``name``."""
    params = [a.arg for a in check.args.args]
    if len(params) != 1:
        raise _where(check, TestsError("check() must take exactly one argument (the candidate)"), tests)
    return _test(reader, check, check.body, dict(scope), {**aliases, params[0]: aliases.get(name, name)}, tests)


def _test(reader: _Reader, node: ast.stmt, body: list[ast.stmt], scope: dict, aliases: dict, tests: str,
          top_level: bool = False) -> Test | None:
    """One test from ``body``; at the top level, a statement that is not an assert binds a name and gives None."""
    try:
        checks = reader.body(body, scope, aliases)
    except TestsError as err:
        raise _where(getattr(err, "statement", node), err, tests) from None
    if top_level and not isinstance(node, ast.Assert):
        return None
    source = ast.get_source_segment(tests, node) or ast.unparse(node)
    label = source if top_level else f"{node.name}({', '.join(a.arg for a in node.args.args)})"
    used = sorted({i for expression, where in checks for i in calls_used(expression, where)})
    return Test(label.splitlines()[0][:120], tuple(checks), tuple(used))


def evaluate_node(node: ast.expr, scope: dict, values: dict[int, Any] | None) -> Any:
    """The value of an understood expression; ``values`` holds each answered call's value (None: no calls yet).

    Raises :class:`Unanswered` for a call without a value; any other exception means the check failed.
    """
    handler = _EVALUATORS.get(type(node))
    if handler is None:
        raise TypeError(f"{type(node).__name__} is not evaluated by the grader")
    return handler(node, scope, values)


def _name(node: ast.Name, scope: dict, values: dict | None) -> Any:
    if node.id in scope:
        bound, where = scope[node.id]
        return evaluate_node(bound, where, values)
    return SAFE_FUNCTIONS[node.id]


def _call(node: ast.Call, scope: dict, values: dict | None) -> Any:
    index = getattr(node, "sandbox_call", None)
    if index is not None:
        if values is None or index not in values:
            raise Unanswered(index)
        return values[index]
    args = [evaluate_node(a, scope, values) for a in node.args]
    kwargs = {k.arg: evaluate_node(k.value, scope, values) for k in node.keywords}
    return _function(node.func)(*args, **kwargs)


def _arithmetic(node: ast.BinOp, scope: dict, values: dict | None) -> Any:
    """Arithmetic on numbers; ``+`` also joins two sequences of one type and ``-`` subtracts sets."""
    a, b = evaluate_node(node.left, scope, values), evaluate_node(node.right, scope, values)
    op = type(node.op)
    if isinstance(a, _NUMBER) and isinstance(b, _NUMBER) and op in _ARITHMETIC:
        if op is ast.Pow and isinstance(a, int) and isinstance(b, int) and abs(b) * max(1, abs(a).bit_length()) > \
                MAX_POWER_BITS:
            raise OverflowError("the power is too large to evaluate in the grader")
        return _ARITHMETIC[op](a, b)
    if op is ast.Add and type(a) is type(b) and isinstance(a, _SEQUENCE):
        return a + b
    if op is ast.Sub and isinstance(a, (set, frozenset)) and isinstance(b, (set, frozenset)):
        return a - b
    raise TypeError(f"{type(node.op).__name__} of {type(a).__name__} and {type(b).__name__} is not evaluated")


def _unary(node: ast.UnaryOp, scope: dict, values: dict | None) -> Any:
    value = evaluate_node(node.operand, scope, values)
    if isinstance(node.op, ast.Not):
        return not value
    if not isinstance(value, _NUMBER) or isinstance(node.op, ast.Invert) and not isinstance(value, int):
        raise TypeError(f"{type(node.op).__name__} of {type(value).__name__} is not evaluated")
    return {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}[type(node.op)](value)


def _compare(node: ast.Compare, scope: dict, values: dict | None) -> bool:
    left = evaluate_node(node.left, scope, values)
    for op, right_node in zip(node.ops, node.comparators):
        right = evaluate_node(right_node, scope, values)
        if isinstance(op, (ast.Is, ast.IsNot)) and not any(v is None or isinstance(v, bool) for v in (left, right)):
            raise TypeError("`is` is evaluated only with None, True or False")
        if not _COMPARE[type(op)](left, right):
            return False
        left = right
    return True


def _bool(node: ast.BoolOp, scope: dict, values: dict | None) -> Any:
    value = None
    for item in node.values:
        value = evaluate_node(item, scope, values)
        if bool(value) != isinstance(node.op, ast.And):
            return value
    return value


def _attribute(node: ast.Attribute, scope: dict, values: dict | None) -> Any:
    value = _function(node)
    if value is None:
        raise TypeError(f"{ast.unparse(node)} is not evaluated")
    return value


def _subscript(node: ast.Subscript, scope: dict, values: dict | None) -> Any:
    container = evaluate_node(node.value, scope, values)
    if not isinstance(container, (*_SEQUENCE, dict)):
        raise TypeError(f"indexing a {type(container).__name__} is not evaluated")
    return container[evaluate_node(node.slice, scope, values)]


_EVALUATORS = {
    ast.Constant: lambda node, scope, values: node.value,
    ast.List: lambda node, scope, values: [evaluate_node(e, scope, values) for e in node.elts],
    ast.Tuple: lambda node, scope, values: tuple(evaluate_node(e, scope, values) for e in node.elts),
    ast.Set: lambda node, scope, values: {evaluate_node(e, scope, values) for e in node.elts},
    ast.Dict: lambda node, scope, values: {evaluate_node(k, scope, values): evaluate_node(v, scope, values)
                                           for k, v in zip(node.keys, node.values)},
    ast.Slice: lambda node, scope, values: slice(*(None if p is None else evaluate_node(p, scope, values)
                                                   for p in (node.lower, node.upper, node.step))),
    ast.Name: _name, ast.Call: _call, ast.BinOp: _arithmetic, ast.UnaryOp: _unary, ast.Compare: _compare,
    ast.BoolOp: _bool, ast.Attribute: _attribute, ast.Subscript: _subscript,
}


def verdict(test: Test, values: dict[int, Any], reasons: dict[int, str]) -> str | None:
    """None if every check of ``test`` holds for the calls' ``values``, else why not (one line).

    ``reasons`` says why a call has no value (it raised, returned something that is not plain data).
    """
    for expression, scope in test.checks:
        try:
            if not evaluate_node(expression, scope, values):
                return "false" + _shown(test, values)
        except Unanswered as missing:
            return reasons.get(missing.args[0], "no value came back")
        except Exception as err:  # noqa: BLE001 - a check that cannot be evaluated on these values fails
            return f"{type(err).__name__}: {err}"[:200]
    return None


def _shown(test: Test, values: dict[int, Any]) -> str:
    """`` (it returned ...)``: the first value the check used, shortened."""
    for index in test.calls:
        if index in values:
            return f" (returned {repr(values[index])[:80]})"
    return ""
