"""A small, safe expression language that selects samples by their metadata (`--filter`), and its report.

Contract:
- `SampleFilter.parse(text)` compiles an expression such as
  `min(width, height) >= 256 and similarity >= 0.28 and pwatermark < 0.5` with a hand-written tokenizer
  and recursive-descent parser (no `eval`, no Python objects reachable). Grammar, loosest first:
  `or`; `and`; `not`; comparisons `< <= > >= == !=` (chained like Python: `0.2 <= x < 0.5`); `+ -`;
  `* /`; unary `-`; atoms: numbers (`256`, `0.28`, `1e-3`), strings (`"success"` or `'success'`),
  `true`/`false`, field names (`[A-Za-z_][A-Za-z0-9_.]*`, or any key in backquotes: `` `a key` ``),
  function calls `min(a, b, ...)`, `max(a, b, ...)` (two or more arguments), `abs(x)` and `has(field)`, and parentheses.
  A syntax error, an unknown function, a wrong argument count or a type clash the parser can see
  (`width < "a"`, `not 3`, a number as the whole filter) raises `FilterError`: one line with the
  1-based character position.
- A record is a dict (the sample's JSON metadata, with its score sidecar's fields laid over it). A field
  that is absent or JSON null is *missing*; a value of the wrong type (a string where a number is
  needed; nan or inf) is *invalid*. Either makes the comparison that needs it unknown, and logic is
  three-valued (Kleene: `false and unknown` is false, `true or unknown` is true, `not unknown` is
  unknown). A sample is kept only when the whole filter is true: a sample whose result is unknown is
  dropped, and counted as such, per field, in the report. `has(field)` is true when the field is present
  and not null, so `not has(pwatermark) or pwatermark < 0.5` keeps the samples that lack it.
- Criteria are the top-level `and` terms of the filter. `FilterReport` counts, per criterion, how many
  samples passed, failed and were unknown; per field referenced, how many samples lacked it or held an
  invalid value; and overall seen, kept, dropped and dropped-as-unknown. Reports are plain dicts
  (`to_dict`/`merge`), so per-shard reports made in workers or ranks add up to the run's report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from argen.utils.errors import ArgenError

UNKNOWN = None  # the third truth value
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<quoted>`[^`]+`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\)|,)
""", re.VERBOSE)
_KEYWORDS = ("and", "or", "not", "true", "false")
_COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")
FUNCTIONS = {"min": (2, None), "max": (2, None), "abs": (1, 1), "has": (1, 1)}


class FilterError(ArgenError):
    """A filter expression that cannot be compiled (one line, with the position)."""


@dataclass
class _Token:
    kind: str  # number, string, name, keyword, op, end
    text: str
    pos: int  # 0-based character offset


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise FilterError(f"--filter: unexpected character {text[pos]!r} at position {pos + 1}")
        kind = match.lastgroup
        if kind != "space":
            word = match.group()
            if kind == "name" and word in _KEYWORDS:
                kind = "keyword"
            elif kind == "quoted":
                kind, word = "name", word[1:-1]
            tokens.append(_Token(kind, word, pos))
        pos = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


# ---------------------------------------------------------------------------------------------- syntax tree
@dataclass
class _Node:
    kind: str  # static type: bool, num, str or any (a field)
    start: int
    end: int


@dataclass
class _Const(_Node):
    value: object = None

    def eval(self, record, problems):
        return self.value


@dataclass
class _Field(_Node):
    name: str = ""

    def eval(self, record, problems):
        value = record.get(self.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.add((self.name, "invalid"))
            return UNKNOWN
        return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _operand(node: _Node, value, want, problems):
    """`value` if it has the type `want` checks, else UNKNOWN (noting an invalid field)."""
    if value is None:
        return UNKNOWN
    if want(value):
        return value
    if isinstance(node, _Field):
        problems.add((node.name, "invalid"))
    return UNKNOWN


@dataclass
class _Arith(_Node):
    op: str = ""
    left: _Node = None
    right: _Node = None

    def eval(self, record, problems):
        a = _operand(self.left, self.left.eval(record, problems), _is_number, problems)
        b = _operand(self.right, self.right.eval(record, problems), _is_number, problems)
        if a is UNKNOWN or b is UNKNOWN:
            return UNKNOWN
        if self.op == "/":
            return a / b if b != 0 else UNKNOWN
        return a + b if self.op == "+" else a - b if self.op == "-" else a * b


@dataclass
class _Negate(_Node):
    operand: _Node = None

    def eval(self, record, problems):
        value = _operand(self.operand, self.operand.eval(record, problems), _is_number, problems)
        return UNKNOWN if value is UNKNOWN else -value


@dataclass
class _Call(_Node):
    name: str = ""
    args: list = field(default_factory=list)

    def eval(self, record, problems):
        if self.name == "has":
            return record.get(self.args[0].name) is not None
        values = [_operand(a, a.eval(record, problems), _is_number, problems) for a in self.args]
        if any(v is UNKNOWN for v in values):
            return UNKNOWN
        return abs(values[0]) if self.name == "abs" else (min if self.name == "min" else max)(values)


def _same_kind(a, b) -> bool:
    return (_is_number(a) and _is_number(b)) or type(a) is type(b)


@dataclass
class _Compare(_Node):
    ops: list = field(default_factory=list)
    operands: list = field(default_factory=list)

    def eval(self, record, problems):
        values = [node.eval(record, problems) for node in self.operands]
        result = True
        for i, op in enumerate(self.ops):
            a, b = values[i], values[i + 1]
            if a is None or b is None:
                result = UNKNOWN if result is not False else False
                continue
            ordered = op not in ("==", "!=")
            if not _same_kind(a, b) or (ordered and not (_is_number(a) or isinstance(a, str))):
                for node in (self.operands[i], self.operands[i + 1]):
                    if isinstance(node, _Field):
                        problems.add((node.name, "invalid"))
                result = UNKNOWN if result is not False else False
                continue
            ok = {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
            if not ok:
                result = False
        return result


def _truth(node: _Node, value, problems):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(node, _Field):
        problems.add((node.name, "invalid"))
    return UNKNOWN


@dataclass
class _Logic(_Node):
    op: str = ""  # and, or, not
    operands: list = field(default_factory=list)

    def eval(self, record, problems):
        if self.op == "not":
            value = _truth(self.operands[0], self.operands[0].eval(record, problems), problems)
            return UNKNOWN if value is UNKNOWN else not value
        decisive = self.op == "or"  # the value that settles the result
        result = not decisive
        for node in self.operands:
            value = _truth(node, node.eval(record, problems), problems)
            if value is decisive:
                return decisive
            if value is UNKNOWN:
                result = UNKNOWN
        return result


# ---------------------------------------------------------------------------------------------- parser
class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.i]

    def error(self, message: str, token: _Token | None = None):
        token = token or self.token
        near = "the end of the filter" if token.kind == "end" else repr(token.text)
        raise FilterError(f"--filter: {message} at position {token.pos + 1} ({near})")

    def take(self, kind: str, text: str | None = None) -> _Token | None:
        token = self.token
        if token.kind == kind and (text is None or token.text == text):
            self.i += 1
            return token
        return None

    def expect_kind(self, node: _Node, kinds: tuple, what: str) -> _Node:
        if node.kind not in kinds + ("any",):
            snippet = self.text[node.start:node.end]
            raise FilterError(f"--filter: {snippet!r} at position {node.start + 1} is {_KIND_WORDS[node.kind]}, "
                              f"but {what} is needed there")
        return node

    def parse(self) -> _Node:
        if self.token.kind == "end":
            self.error("empty filter")
        node = self.parse_or()
        if self.token.kind != "end":
            self.error("unexpected " + ("text" if self.token.kind != "op" else f"{self.token.text!r}"))
        return self.expect_kind(node, ("bool",), "a condition (a comparison, has(), and/or/not)")

    def _logic(self, op: str, parse_next) -> _Node:
        first = parse_next()
        operands = [first]
        while self.take("keyword", op):
            operands.append(parse_next())
        if len(operands) == 1:
            return first
        for node in operands:
            self.expect_kind(node, ("bool",), f"a condition on each side of {op!r}")
        return _Logic("bool", first.start, operands[-1].end, op=op, operands=operands)

    def parse_or(self) -> _Node:
        return self._logic("or", self.parse_and)

    def parse_and(self) -> _Node:
        return self._logic("and", self.parse_not)

    def parse_not(self) -> _Node:
        token = self.take("keyword", "not")
        if token is None:
            return self.parse_compare()
        operand = self.expect_kind(self.parse_not(), ("bool",), "a condition after 'not'")
        return _Logic("bool", token.pos, operand.end, op="not", operands=[operand])

    def parse_compare(self) -> _Node:
        first = self.parse_sum()
        operands, ops = [first], []
        while self.token.kind == "op" and self.token.text in _COMPARISONS:
            op = self.take("op").text
            operands.append(self.parse_sum())
            ops.append(op)
        if not ops:
            return first
        for op, a, b in zip(ops, operands, operands[1:]):
            kinds = {a.kind, b.kind} - {"any"}
            if len(kinds) > 1:
                raise FilterError(f"--filter: {self.text[a.start:b.end]!r} at position {a.start + 1} compares "
                                  f"{' with '.join(_KIND_WORDS[k] for k in (a.kind, b.kind))}")
            if op not in ("==", "!=") and kinds == {"bool"}:
                raise FilterError(f"--filter: {op!r} at position {a.end + 1} orders conditions; use == or !=")
        return _Compare("bool", first.start, operands[-1].end, ops=ops, operands=operands)

    def _arith(self, ops: tuple, parse_next) -> _Node:
        node = parse_next()
        while self.token.kind == "op" and self.token.text in ops:
            op = self.take("op").text
            right = parse_next()
            for side in (node, right):
                self.expect_kind(side, ("num",), f"a number on each side of {op!r}")
            node = _Arith("num", node.start, right.end, op=op, left=node, right=right)
        return node

    def parse_sum(self) -> _Node:
        return self._arith(("+", "-"), self.parse_term)

    def parse_term(self) -> _Node:
        return self._arith(("*", "/"), self.parse_unary)

    def parse_unary(self) -> _Node:
        token = self.take("op", "-")
        if token is None:
            return self.parse_atom()
        operand = self.expect_kind(self.parse_unary(), ("num",), "a number after '-'")
        return _Negate("num", token.pos, operand.end, operand=operand)

    def parse_atom(self) -> _Node:
        token = self.token
        end = token.pos + len(token.text)
        if self.take("number"):
            return _Const("num", token.pos, end, value=float(token.text) if any(c in token.text for c in ".eE")
                          else int(token.text))
        if self.take("string"):
            body = token.text[1:-1]
            return _Const("str", token.pos, end, value=re.sub(r"\\(.)", r"\1", body))
        if self.take("keyword", "true") or self.take("keyword", "false"):
            return _Const("bool", token.pos, end, value=token.text == "true")
        if self.take("name"):
            if self.take("op", "("):
                return self.parse_call(token)
            return _Field("any", token.pos, self.tokens[self.i - 1].pos + len(self.tokens[self.i - 1].text),
                          name=token.text)
        if self.take("op", "("):
            node = self.parse_or()
            close = self.take("op", ")")
            if close is None:
                self.error("the '(' is not closed", token)
            node.start, node.end = token.pos, close.pos + 1
            return node
        if token.kind == "end":
            self.error("the filter ends too early")
        self.error("expected a number, a string, a field or '('")

    def parse_call(self, name: _Token) -> _Node:
        if name.text not in FUNCTIONS:
            raise FilterError(f"--filter: unknown function {name.text!r} at position {name.pos + 1} (use "
                              f"{', '.join(FUNCTIONS)})")
        args = []
        if not self.take("op", ")"):
            while True:
                args.append(self.parse_or())
                if self.take("op", ")"):
                    break
                if not self.take("op", ","):
                    self.error(f"expected ',' or ')' in the call of {name.text}()")
        close = self.tokens[self.i - 1]
        low, high = FUNCTIONS[name.text]
        if len(args) < low or (high is not None and len(args) > high):
            count = "1 argument" if low == high else f"at least {low} arguments"
            raise FilterError(f"--filter: {name.text}() at position {name.pos + 1} takes {count}, not {len(args)}")
        if name.text == "has":
            if not isinstance(args[0], _Field):
                raise FilterError(f"--filter: has() at position {name.pos + 1} takes a field name")
            return _Call("bool", name.pos, close.pos + 1, name="has", args=args)
        for arg in args:
            self.expect_kind(arg, ("num",), f"a number in {name.text}()")
        return _Call("num", name.pos, close.pos + 1, name=name.text, args=args)


_KIND_WORDS = {"bool": "a condition", "num": "a number", "str": "a string", "any": "a field"}


def _fields(node: _Node, out: list[str]) -> list[str]:
    if isinstance(node, _Field) and node.name not in out:
        out.append(node.name)
    for attr in ("left", "right", "operand"):
        child = getattr(node, attr, None)
        if child is not None:
            _fields(child, out)
    for child in getattr(node, "operands", None) or getattr(node, "args", None) or []:
        _fields(child, out)
    return out


# ---------------------------------------------------------------------------------------------- public API
class SampleFilter:
    """A compiled `--filter` expression; `test(record)` -> (keep, per-criterion outcomes, field problems)."""

    def __init__(self, text: str):
        self.text = text
        root = _Parser(self.text).parse()
        self.criteria = root.operands if isinstance(root, _Logic) and root.op == "and" else [root]
        self.criteria_text = [self.text[c.start:c.end] for c in self.criteria]
        self.fields = _fields(root, [])

    @classmethod
    def parse(cls, text: str | SampleFilter | None) -> SampleFilter | None:
        if text is None or isinstance(text, SampleFilter):
            return text
        return cls(text)

    def test(self, record: dict) -> tuple[bool, list, set]:
        problems: set = set()
        outcomes = [c.eval(record, problems) for c in self.criteria]
        return all(o is True for o in outcomes), outcomes, problems

    def new_report(self) -> FilterReport:
        return FilterReport(self)


class FilterReport:
    """What a filter kept and dropped, per criterion and per field (see the module docstring)."""

    def __init__(self, sample_filter: SampleFilter):
        self.filter = sample_filter
        self.seen = self.kept = self.unknown = 0
        self.passed = [0] * len(sample_filter.criteria)
        self.failed = [0] * len(sample_filter.criteria)
        self.undecided = [0] * len(sample_filter.criteria)
        self.missing = dict.fromkeys(sample_filter.fields, 0)
        self.invalid = dict.fromkeys(sample_filter.fields, 0)

    def add(self, record: dict) -> bool:
        """Test one sample's record, count it, and return whether it is kept."""
        keep, outcomes, problems = self.filter.test(record)
        self.seen += 1
        self.kept += keep
        for i, outcome in enumerate(outcomes):
            if outcome is True:
                self.passed[i] += 1
            elif outcome is False:
                self.failed[i] += 1
            else:
                self.undecided[i] += 1
        if not keep and False not in outcomes:
            self.unknown += 1
        for name in self.filter.fields:
            if record.get(name) is None:
                self.missing[name] += 1
        for name, _ in problems:
            self.invalid[name] += 1
        return keep

    def to_dict(self) -> dict:
        return {"filter": self.filter.text, "seen": self.seen, "kept": self.kept, "dropped": self.seen - self.kept,
                "dropped_unknown": self.unknown,
                "criteria": [{"criterion": text, "passed": p, "failed": f, "unknown": u} for text, p, f, u
                             in zip(self.filter.criteria_text, self.passed, self.failed, self.undecided)],
                "fields": {name: {"missing": self.missing[name], "invalid": self.invalid[name]}
                           for name in self.filter.fields}}

    def merge(self, other: dict | None) -> None:
        """Add a report dict (from `to_dict`, e.g. one shard's) of the same filter."""
        if not other:
            return
        if other["filter"] != self.filter.text:
            raise ArgenError(f"cannot add the report of filter {other['filter']!r} to that of {self.filter.text!r}")
        self.seen += other["seen"]
        self.kept += other["kept"]
        self.unknown += other["dropped_unknown"]
        for i, row in enumerate(other["criteria"]):
            self.passed[i] += row["passed"]
            self.failed[i] += row["failed"]
            self.undecided[i] += row["unknown"]
        for name, row in other["fields"].items():
            self.missing[name] += row["missing"]
            self.invalid[name] += row["invalid"]

    def lines(self) -> list[str]:
        """Human-readable summary for the run's log."""
        share = (lambda n: f"{n / self.seen:.1%}") if self.seen else (lambda n: "-")
        out = [f"filter {self.filter.text!r}: kept {self.kept} of {self.seen} samples ({share(self.kept)}), "
               f"dropped {self.seen - self.kept} ({self.unknown} only because a field was missing or invalid)"]
        for text, p, f, u in zip(self.filter.criteria_text, self.passed, self.failed, self.undecided):
            out.append(f"  criterion {text!r}: passed {p}, failed {f}, unknown {u}")
        for name in self.filter.fields:
            if self.missing[name] or self.invalid[name]:
                out.append(f"  field {name!r}: missing in {self.missing[name]} samples, invalid in "
                           f"{self.invalid[name]}")
        return out
