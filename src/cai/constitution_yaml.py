"""Load, validate and write constitutions as YAML, with errors that point at the line.

`load_constitution` takes a built-in name or a file path; `parse_constitution` validates YAML
text into a `cai.constitution.Constitution`; `dump_constitution` writes one back. This module
imports `cai.constitution` (the data model), never the reverse.

We validate the composed YAML node tree rather than the plain Python objects `yaml.safe_load`
returns, because only nodes remember where they came from: every error names the file, the
entry, the field and the line. Working on nodes also lets us reject duplicate keys, which
`safe_load` silently lets the last one win.

Text fields are stripped of surrounding whitespace (a ``|`` block ends with a newline that must
not leak into prompts). Inside an example, ``principle: <id>`` may stand in for the principle's
text (``critique_request`` + ``revision_request``, or ``question``); the dumper always writes the
full text, so a dumped file reads back to an equal `Constitution`.

A feedback principle may carry ``rlcd: {follow: ..., violate: ...}``, the two system-turn
statements of an RLCD contrast pair (`cai.constitution.RlcdStatements`); both are required once
``rlcd`` is given, and are checked like every other text field.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Callable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cai.constitution import (
    Constitution,
    CotFeedbackExample,
    CritiquePrinciple,
    CritiqueRevisionExample,
    FeedbackExample,
    FeedbackPrinciple,
    RlcdStatements,
)
from cai.errors import CaiError
from cai.types import Message

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "version",
    "critique_revision_principles",
    "feedback_principles",
    "critique_revision_examples",
    "feedback_examples",
    "cot_feedback_examples",
)
# Example lists may be left out: a constitution without examples prompts zero-shot.
_REQUIRED_TOP_LEVEL = TOP_LEVEL_KEYS[:5]
RLCD_KEYS = ("follow", "violate")
"""The keys of a feedback principle's ``rlcd`` mapping, both required."""
_ROLES = ("system", "user", "assistant")
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TAG = "tag:yaml.org,2002:"


class _Parser:
    """Walks the node tree of one file; `fail` builds the one-sentence error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: Node, where: str, problem: str) -> CaiError:
        """An error about one node: '<File>, line N: <where> <problem>.'"""
        line = node.start_mark.line + 1
        return self.whole(f", line {line}: {where} {problem}", space="")

    def whole(self, problem: str, space: str = " ") -> CaiError:
        """An error about the file as a whole: '<File> <problem>.'"""
        end = "" if problem.endswith("?") else "."
        return CaiError(f"{self.source[0].upper()}{self.source[1:]}{space}{problem}{end}")

    # -- generic shapes ------------------------------------------------------------------------

    def pairs(self, node: Node, where: str) -> dict[str, tuple[Node, Node]]:
        """A mapping's entries by key, rejecting non-text and repeated keys."""
        if not isinstance(node, MappingNode):
            raise self.fail(node, where, f"must be a mapping of keys to values, not {_describe(node)}")
        out: dict[str, tuple[Node, Node]] = {}
        for key, value in node.value:
            if not (isinstance(key, ScalarNode) and key.tag == _TAG + "str"):
                raise self.fail(key, where, f"has a key that is {_describe(key)} instead of a name")
            if key.value in out:
                first = out[key.value][0].start_mark.line + 1
                raise self.fail(key, where, f"has the key '{key.value}' twice (first on line {first})")
            out[key.value] = (key, value)
        return out

    def check_keys(
        self,
        pairs: dict[str, tuple[Node, Node]],
        node: Node,
        where: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...],
    ) -> None:
        for name, (key, _) in pairs.items():
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else "allowed keys are " + ", ".join(allowed)
                raise self.fail(key, where, f"has the unknown key '{name}'; {hint}")
        missing = [k for k in required if k not in pairs]
        if missing:
            names = ", ".join(f"'{k}'" for k in missing)
            raise self.fail(node, where, f"is missing the required key{'s' * (len(missing) > 1)} {names}")

    def items(self, node: Node, where: str, allow_empty: bool) -> list[Node]:
        if not isinstance(node, SequenceNode):
            raise self.fail(node, where, f"must be a list, not {_describe(node)}")
        if not node.value and not allow_empty:
            raise self.fail(node, where, "is an empty list; it needs at least one entry")
        return list(node.value)

    def text(self, node: Node, where: str) -> str:
        if isinstance(node, ScalarNode) and node.tag == _TAG + "str":
            if not node.value.strip():
                raise self.fail(node, where, "is empty or only whitespace; write its text")
            return node.value.strip()
        # YAML reads `yes`, `1.5` or `null` as non-text; quoting keeps them as written.
        hint = " (put it in quotes)" if node.tag.removeprefix(_TAG) in ("bool", "int", "float") else ""
        raise self.fail(node, where, f"must be text, not {_describe(node)}{hint}")

    def ident(self, node: Node, where: str) -> str:
        value = self.text(node, where)
        if not _ID_PATTERN.fullmatch(value):
            problem = f"is '{value}' but must be a short name of letters, digits, '-', '_' or '.', like 'privacy'"
            raise self.fail(node, where, problem)
        return value

    # -- constitution parts --------------------------------------------------------------------

    def principles(
        self,
        node: Node,
        list_name: str,
        fields: tuple[str, ...],
        optional: dict[str, Callable[[Node, str], Any]] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Principles as ``{id: {field: value}}`` in file order, checking ids are unique.

        ``fields`` are required text; ``optional`` maps each optional key to the method that reads
        its value (given the value node and the words naming it), and a key left out is absent.
        """
        optional = optional or {}
        out: dict[str, dict[str, str]] = {}
        id_lines: dict[str, int] = {}
        for i, item in enumerate(self.items(node, list_name, allow_empty=False)):
            entry = f"{list_name}[{i}]"
            pairs = self.pairs(item, entry)
            pid = ""
            # Read the id first so that every later error about this entry can name it.
            if "id" in pairs:
                id_node = pairs["id"][1]
                pid = self.ident(id_node, f"{entry} field 'id'")
                entry = f"{entry} (id '{pid}')"
                if pid in id_lines:
                    problem = f"reuses an id first given on line {id_lines[pid]}; ids must be unique"
                    raise self.fail(id_node, entry, problem)
                id_lines[pid] = id_node.start_mark.line + 1
            self.check_keys(pairs, item, entry, ("id", *fields, *optional), ("id", *fields))
            out[pid] = {f: self.text(pairs[f][1], f"{entry} field '{f}'") for f in fields}
            out[pid].update({key: read(pairs[key][1], f"{entry} field '{key}'")
                             for key, read in optional.items() if key in pairs})
        return out

    def rlcd(self, node: Node, where: str) -> RlcdStatements:
        """A feedback principle's ``rlcd`` mapping: both statements, as text."""
        pairs = self.pairs(node, where)
        self.check_keys(pairs, node, where, RLCD_KEYS, RLCD_KEYS)
        field = where.removesuffix("'")  # "... field 'rlcd" + ".follow'"
        return RlcdStatements(**{k: self.text(pairs[k][1], f"{field}.{k}'") for k in RLCD_KEYS})

    def conversation(self, node: Node, entry: str) -> list[dict[str, str]]:
        """A non-empty chat in the HF format whose last message is the user's."""
        messages = self.items(node, f"{entry} field 'conversation'", allow_empty=False)
        out = []
        for j, item in enumerate(messages):
            at = f"{entry} field 'conversation[{j}]"  # the closing quote is added per use
            pairs = self.pairs(item, at + "'")
            self.check_keys(pairs, item, at + "'", ("role", "content"), ("role", "content"))
            role_node = pairs["role"][1]
            role = self.text(role_node, f"{at}.role'")
            if role not in _ROLES:
                problem = f"is '{role}' but must be one of {', '.join(_ROLES)}"
                raise self.fail(role_node, f"{at}.role'", problem)
            if role == "system" and j > 0:
                problem = "is 'system', which is allowed only as the first message"
                raise self.fail(role_node, f"{at}.role'", problem)
            out.append({"role": role, "content": self.text(pairs["content"][1], f"{at}.content'")})
        if out[-1]["role"] != "user":
            problem = "must be a 'user' message, because the example's responses answer the conversation's last turn"
            raise self.fail(messages[-1], f"{entry} field 'conversation[{len(out) - 1}]'", problem)
        return out

    def example(
        self,
        node: Node,
        entry: str,
        fields: tuple[str, ...],
        principle_fields: tuple[str, ...],
        principles: dict[str, dict[str, Any]],
        principle_list: str,
    ) -> dict[str, Any]:
        """One example as a dict of field values, with ``principle: <id>`` expanded to its text."""
        pairs = self.pairs(node, entry)
        allowed = ("conversation", *fields, *principle_fields, "principle")
        self.check_keys(pairs, node, entry, allowed, ("conversation", *fields))
        out: dict[str, Any] = {"conversation": self.conversation(pairs["conversation"][1], entry)}
        out.update({f: self.text(pairs[f][1], f"{entry} field '{f}'") for f in fields})
        if "principle" in pairs:
            ref_node = pairs["principle"][1]
            both = [f for f in principle_fields if f in pairs]
            if both:
                raise self.fail(ref_node, entry, f"gives both 'principle' and '{both[0]}'; keep only one of them")
            ref = self.text(ref_node, f"{entry} field 'principle'")
            if ref not in principles:
                close = difflib.get_close_matches(ref, list(principles), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                problem = f"refers to '{ref}', which is not an id in {principle_list}{hint}"
                raise self.fail(ref_node, f"{entry} field 'principle'", problem)
            out.update({f: principles[ref][f] for f in principle_fields})
        else:
            missing = [f for f in principle_fields if f not in pairs]
            if missing:
                problem = (f"is missing '{missing[0]}' (or give 'principle: <id>' to use the text of a "
                           f"principle from {principle_list})")
                raise self.fail(node, entry, problem)
            out.update({f: self.text(pairs[f][1], f"{entry} field '{f}'") for f in principle_fields})
        if "answer" in out and out["answer"] not in ("A", "B"):
            problem = f"is '{out['answer']}' but must be A or B"
            raise self.fail(pairs["answer"][1], f"{entry} field 'answer'", problem)
        return out

    def examples(
        self,
        top: dict[str, tuple[Node, Node]],
        key: str,
        fields: tuple[str, ...],
        principle_fields: tuple[str, ...],
        principles: dict[str, dict[str, Any]],
        principle_list: str,
    ) -> list[dict[str, Any]]:
        """One (optional) example list; see `example`."""
        if key not in top:
            return []
        items = self.items(top[key][1], key, allow_empty=True)
        return [self.example(item, f"{key}[{i}]", fields, principle_fields, principles, principle_list)
                for i, item in enumerate(items)]

    def constitution(self, root: Node | None) -> Constitution:
        if root is None:
            raise self.whole("is empty; it should be a mapping with the keys " + ", ".join(TOP_LEVEL_KEYS))
        if not isinstance(root, MappingNode):
            problem = f"must be a mapping with the keys name, description, ..., not {_describe(root)}"
            raise self.fail(root, "the top level", problem)
        top = self.pairs(root, "the top level")
        self.check_keys(top, root, "the top level", TOP_LEVEL_KEYS, _REQUIRED_TOP_LEVEL)

        name = self.text(top["name"][1], "top-level key 'name'")
        description = self.text(top["description"][1], "top-level key 'description'")
        version_node = top["version"][1]
        # A bare `version: 1.2` is a float to YAML; keep what the user wrote instead of refusing it.
        if isinstance(version_node, ScalarNode) and version_node.tag in (_TAG + "int", _TAG + "float"):
            version = version_node.value
        else:
            version = self.text(version_node, "top-level key 'version'")

        # Principles first, whatever the key order in the file, so examples can refer to them.
        crit_list, feed_list = "critique_revision_principles", "feedback_principles"
        crit = self.principles(top[crit_list][1], crit_list, ("critique_request", "revision_request"))
        feed = self.principles(top[feed_list][1], feed_list, ("question",), {"rlcd": self.rlcd})
        cr_ex = self.examples(top, "critique_revision_examples", ("response", "critique", "revision"),
                              ("critique_request", "revision_request"), crit, crit_list)
        fb_ex = self.examples(top, "feedback_examples", ("response_a", "response_b", "answer"),
                              ("question",), feed, feed_list)
        cot_ex = self.examples(top, "cot_feedback_examples", ("response_a", "response_b", "reasoning", "answer"),
                               ("question",), feed, feed_list)
        return Constitution(
            name=name,
            description=description,
            version=version,
            critique_revision_principles=tuple(CritiquePrinciple(id=k, **v) for k, v in crit.items()),
            feedback_principles=tuple(FeedbackPrinciple(id=k, **v) for k, v in feed.items()),
            critique_revision_examples=tuple(CritiqueRevisionExample(**e) for e in cr_ex),
            feedback_examples=tuple(FeedbackExample(**e) for e in fb_ex),
            cot_feedback_examples=tuple(CotFeedbackExample(**e) for e in cot_ex),
        )


def _describe(node: Node) -> str:
    """What a node is, in words, for 'must be X, not Y' messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = {"null": "empty (null)", "bool": "a true/false value", "int": "a number", "float": "a number",
            "str": "text"}.get(node.tag.removeprefix(_TAG))
    return kind or f"a value tagged {node.tag}"


def parse_constitution(data: bytes | str, source: str = "constitution text") -> Constitution:
    """Parse and validate constitution YAML.

    Args:
        data: the file's bytes (must be UTF-8) or its text.
        source: the subject of error sentences, e.g. ``"constitution file 'my.yaml'"``.

    Returns:
        The validated constitution.

    Raises:
        CaiError: one sentence naming the file, entry, field and line of the first problem.
    """
    parser = _Parser(source)
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise parser.whole(f"is not valid UTF-8 text (line {line}); save it with UTF-8 encoding") from e
    try:
        root = yaml.compose(data, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = ", ".join(" ".join(str(part).split()) for part in (e.context, e.problem) if part)
        raise parser.whole(f"is not valid YAML{where}: {problem}") from e
    except yaml.YAMLError as e:  # e.g. a control character the YAML reader refuses
        raise parser.whole(f"is not valid YAML: {' '.join(str(e).split())}") from e
    return parser.constitution(root)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line text as ``|`` blocks so dumped files stay readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar(_TAG + "str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _chat(conversation: list[Message]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in conversation]


def dump_constitution(c: Constitution) -> str:
    """YAML text for ``c`` that `load_constitution` reads back to an equal object.

    Every key is written out: examples carry the full text of their principle, not ``principle: <id>``.
    """
    doc = {
        "name": c.name,
        "description": c.description,
        "version": c.version,
        "critique_revision_principles": [
            {"id": p.id, "critique_request": p.critique_request, "revision_request": p.revision_request}
            for p in c.critique_revision_principles
        ],
        "feedback_principles": [
            {"id": p.id, "question": p.question,
             **({"rlcd": {"follow": p.rlcd.follow, "violate": p.rlcd.violate}} if p.rlcd else {})}
            for p in c.feedback_principles
        ],
        "critique_revision_examples": [
            {"conversation": _chat(e.conversation), "response": e.response,
             "critique_request": e.critique_request, "critique": e.critique,
             "revision_request": e.revision_request, "revision": e.revision}
            for e in c.critique_revision_examples
        ],
        "feedback_examples": [
            {"conversation": _chat(e.conversation), "response_a": e.response_a, "response_b": e.response_b,
             "question": e.question, "answer": e.answer}
            for e in c.feedback_examples
        ],
        "cot_feedback_examples": [
            {"conversation": _chat(e.conversation), "response_a": e.response_a, "response_b": e.response_b,
             "question": e.question, "reasoning": e.reasoning, "answer": e.answer}
            for e in c.cot_feedback_examples
        ],
    }
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return f"# A cai constitution. Check it with: cai constitution validate FILE\n{body}"


# --------------------------------------------------------------------------- files and built-in names


def builtin_dir() -> Traversable:
    """The folder that holds the built-in constitutions."""
    return resources.files("cai") / "constitutions"


def builtin_constitution_names() -> list[str]:
    """Names of the constitutions shipped in ``cai/constitutions/*.yaml``, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_constitution(spec: str | Path) -> Constitution:
    """Load and validate a constitution.

    Args:
        spec: a built-in name (see `builtin_constitution_names`) or a path to a YAML file.
            A `Path` is always a path; a string is a built-in name when it is one.

    Returns:
        The validated constitution.

    Raises:
        CaiError: the file is missing, unreadable or invalid; the sentence names the file,
            the entry, the field and the line.
    """
    if isinstance(spec, str) and spec in builtin_constitution_names():
        path = builtin_dir() / f"{spec}.yaml"
        return parse_constitution(path.read_bytes(), source=f"built-in constitution '{spec}'")
    path = Path(spec)
    if not path.exists():
        names = ", ".join(builtin_constitution_names())
        raise CaiError(
            f"Constitution '{spec}' is neither a built-in name ({names}) nor an existing file."
        )
    if not path.is_file():
        raise CaiError(f"Constitution path '{path}' is a directory; give the path of a YAML file.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaiError(f"Cannot read constitution file '{path}': {e.strerror}.") from e
    return parse_constitution(data, source=f"constitution file '{path}'")


def save_constitution(constitution: Constitution, path: str | Path) -> None:
    """Write `dump_constitution(constitution)` to ``path`` (UTF-8), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_constitution(constitution), encoding="utf-8")
