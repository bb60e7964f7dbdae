"""docs/internals.md and README.md's layout against the code: what they name exists.

From every backticked span of docs/internals.md outside code blocks:

- a dotted name (``oppu.store.config_hash``, ``publish.AdapterPublisher``, ``Task.score``,
  ``users.quantize``) resolves: absolutely, or within the section's package (a heading such as
  ``## Training — `oppu.training``` sets it) and its modules, or as a run config key;
- a call (``load_model(uri, *, device="cpu", ...)``, ``.publish_state(user, ...)``) names a
  function, class or method of the section's package, and every parameter it spells is one the
  code takes;
- a repository path (``tests/unit/``, ``configs/deepspeed/zero{2,3}.json``, ``jobs/*.py``) exists.

Spans that are none of these (values, shell lines, names of other libraries' objects) are not
checked. README.md's layout block names every part of ``oppu/``, and each entry exists.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INTERNALS = ROOT / "docs" / "internals.md"

_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_MEMBER = re.compile(r"\.([A-Za-z_]\w*)(?::.*)?")
_CALL_NAME = re.compile(r"(?:with )?(\.?[A-Za-z_][\w.]*)\(")
_SECTION = re.compile(r"^#+ .*— `(oppu[\w.]*)`", re.M)
# Last parts of a dotted span that make it a file name, not a Python name.
_FILE_SUFFIXES = {"json", "safetensors", "pt", "md", "yaml", "parquet", "py", "gguf", "txt"}
# Other libraries whose names the doc spells, where oppu has a module of the same name.
_OTHER_LIBRARIES = {"deepspeed"}


def doc_spans(text: str) -> list[tuple[str, str]]:
    """``(section package, span)`` for every backticked span outside fenced code blocks and
    outside the rank path's "before" list (which names code that is gone, on purpose)."""
    def blank(match: re.Match) -> str:
        return "\n" * match[0].count("\n")

    text = re.sub(r"```.*?```", blank, text, flags=re.S)
    text = re.sub(r"\*\*Before\*\*.*?(?=\*\*After\*\*)", blank, text, flags=re.S)
    sections = {m.start(): m[1] for m in _SECTION.finditer(text)}
    headings = [m.start() for m in re.finditer(r"^## ", text, flags=re.M)]
    spans = []
    for match in re.finditer(r"`([^`]+)`", text):
        heading = max((h for h in headings if h < match.start()), default=-1)
        spans.append((sections.get(heading, "oppu"), " ".join(match[1].split())))
    return spans


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _children(package: str) -> list:
    """``package`` and its modules one level down."""
    root = _import(package)
    if root is None:
        return []
    children = [_import(f"{package}.{info.name}") for info in pkgutil.iter_modules(getattr(root, "__path__", []))]
    return [root, *(child for child in children if child is not None)]


def _near(package: str) -> list:
    """Where a section's names live, as ``(scope, whether its submodules count)``: the section's
    package and its modules, then oppu and its top-level modules (other packages lend their
    exports, not their submodules: ``engine`` in the training section is DeepSpeed's, not
    ``oppu.serving.engine``)."""
    own = _children(package)
    return [(own[0], True), *((m, False) for m in own[1:]),
            *((m, m.__name__ == "oppu") for m in _children("oppu") if m.__name__ != package)]


@functools.cache
def _everywhere() -> tuple:
    import oppu

    found = [_import(info.name) for info in pkgutil.walk_packages(oppu.__path__, "oppu.")]
    return tuple((module, True) for module in found if module is not None)


def _ours(obj) -> bool:
    if inspect.ismodule(obj):
        return obj.__name__.startswith("oppu")
    return isinstance(obj, dataclasses.Field) or str(getattr(obj, "__module__", "")).startswith("oppu")


def _attribute(obj, name: str):
    if hasattr(obj, name):
        return getattr(obj, name)
    fields = getattr(obj, "__dataclass_fields__", {})
    if name in fields:  # a dataclass field without a class-level default
        return fields[name]
    raise AttributeError(name)


def _lookup(name: str, scopes) -> list:
    """Every object of oppu's that dotted ``name`` reaches from one of ``scopes``."""
    head, *rest = name.split(".")
    found = []
    for scope, submodules_count in scopes:
        try:
            obj = _attribute(scope, head)
            if not _ours(obj) or (inspect.ismodule(obj) and not submodules_count):
                continue
            for part in rest:
                obj = _attribute(obj, part)
        except AttributeError:
            continue
        found.append(obj)
    return found


def resolve(name: str, package: str) -> list:
    """What ``name`` names in a section about ``package`` (nearest first); empty if nothing."""
    parts = name.split(".")
    if parts[0] == "oppu":
        for cut in range(len(parts), 0, -1):
            if (module := _import(".".join(parts[:cut]))) is not None:
                return _lookup(".".join(["x", *parts[cut:]]), [(type("Scope", (), {"x": module}), True)])
        return []
    return _lookup(name, _near(package)) or _lookup(name, _everywhere())


def _members_named(name: str, package: str) -> list:
    """Members called ``name`` (methods, properties, dataclass fields) of oppu's classes, nearest first."""
    for modules in (_near(package), _everywhere()):
        found = []
        for module, _ in modules:
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__:
                    try:
                        found.append(_attribute(cls, name))
                    except AttributeError:
                        pass
        if found:
            return found
    return []


def _bound_elsewhere(name: str) -> bool:
    """Whether an oppu module holds ``name`` as another library's object (``asdict``)."""
    return any(hasattr(module, name) and not _ours(getattr(module, name)) for module, _ in _everywhere())


def _config_key(name: str) -> bool:
    """``users.quantize``, ``base.optim``, ``cfg.users.trainer``: a run config key."""
    from oppu import run_config

    cls = run_config.RunConfig
    for part in name.removeprefix("cfg.").split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        cls = fields[part].type
        cls = getattr(run_config, cls, cls) if isinstance(cls, str) else cls
    return True


def _split_call(span: str) -> tuple[str, str] | None:
    """``(name, parameters)`` of a span that spells a call (``f(a, b=1) -> x``), else None."""
    if not (match := _CALL_NAME.match(span)):
        return None
    depth = 0
    for end in range(match.end() - 1, len(span)):
        depth += (span[end] in "([{") - (span[end] in ")]}")
        if depth == 0:
            rest = span[end + 1:].strip()
            return (match[1], span[match.end():end]) if not rest or rest.startswith(("->", ":")) else None
    return None


def _parameter_names(spelled: str) -> list[str]:
    """The parameter names a documented call spells (``*``, ``...`` and placeholders skipped)."""
    names, depth, current = [], 0, ""
    for char in spelled + ",":
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            if match := re.match(r"\s*\*{0,2}([A-Za-z_]\w*)\s*(?:[:=]|$)", current):
                names.append(match[1])
            current = ""
        else:
            current += char
    return names


def _accepts(target, names: list[str]) -> bool:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return True
    return set(names) <= set(signature.parameters)


def _check_call(name: str, spelled: str, package: str) -> str | None:
    if name.startswith("."):  # a method of the class the sentence is about
        targets = _members_named(name[1:], package)
    else:
        targets = [t for t in resolve(name, package) if callable(t)]
        if not targets and "." not in name:
            targets = _members_named(name, package)
    targets = [t for t in targets if callable(t)]
    if not targets:
        head = name.split(".")[0]
        ours = name.startswith(".") or head == "oppu" or (
            head not in _OTHER_LIBRARIES and (_lookup(head, _near(package)) if "." in name
                                              else not _bound_elsewhere(name)))
        return f"{name} names nothing in {package}" if ours else None
    names = _parameter_names(spelled)
    if not any(_accepts(target, names) for target in targets):
        taken = inspect.signature(targets[0]).parameters
        return f"{name} takes no {[n for n in names if n not in taken]} (its parameters: {list(taken)})"
    return None


def check_span(span: str, package: str) -> str | None:
    """What is wrong with one span (None: nothing, or nothing this test checks)."""
    if call := _split_call(span):
        return _check_call(*call, package)
    if (member := _MEMBER.fullmatch(span)) and member[1] not in _FILE_SUFFIXES:
        return None if _members_named(member[1], package) else f".{member[1]} is a member of no class"
    if "/" in span and re.fullmatch(r"[\w./*{},-]+", span):
        first = span.split("/")[0]
        for base in (ROOT, ROOT / "oppu"):
            if first and (base / first).exists():
                options = re.fullmatch(r"(.*)\{([\w,]+)\}(.*)", span)
                paths = [f"{options[1]}{o}{options[3]}" for o in options[2].split(",")] if options else [span]
                missing = [p for p in paths if not glob.glob(str(base / p))]
                return f"no {', '.join(missing)} under {base}" if missing else None
        return None
    if _DOTTED.fullmatch(span) and span.rsplit(".", 1)[1] not in _FILE_SUFFIXES:
        if resolve(span, package) or _config_key(span):
            return None
        head = span.split(".")[0]
        ours = head in ("oppu", "cfg") or (head not in _OTHER_LIBRARIES and _lookup(head, _near(package)))
        return f"{span} does not resolve in {package}" if ours else None
    return None


def test_everything_internals_md_names_exists():
    problems = sorted({f"{problem}  (`{span}`)" for package, span in doc_spans(INTERNALS.read_text())
                       if (problem := check_span(span, package))})
    assert not problems, "docs/internals.md names what the code lacks:\n" + "\n".join(problems)


@pytest.mark.parametrize("span, package, wrong", [
    ("oppu.store.config_hash", "oppu", False),
    ("oppu.store.no_such_function", "oppu", True),
    ("publish.AdapterPublisher.publish_state", "oppu.training", False),
    ("publish.AdapterPublisher.lora_config", "oppu.training", True),
    ("users.quantize", "oppu", False),
    ("load_model(uri, *, device=\"cpu\", dtype=None, quantize=\"none\") -> (model, tokenizer)", "oppu.models", False),
    ("load_model(uri, device, precision)", "oppu.models", True),
    (".existing(user) -> Manifest | None", "oppu.training", False),
    ("configs/deepspeed/zero{2,3}.json", "oppu", False),
    ("configs/deepspeed/zero{2,4}.json", "oppu", True),
    ("ray.train.get_checkpoint()", "oppu.training", False),  # another library's: not checked
    ("deepspeed.zero.GatheredParameters(model.parameters())", "oppu.training", False),
    ("deepspeed.deepspeed_config(stage, *, bf16, grad_accum, micro_batch, lr, ...) -> dict", "oppu.training", False),
    ("deepspeed.deepspeed_config(stage, *, fp8)", "oppu.training", True),
    (".peft_config", "oppu.training", False),
    (".lora_config(model)", "oppu.training", True),
    ("asdict(users.peft)", "oppu.training", False),
    ("lora_config(model)", "oppu.training", True),
])
def test_the_check_tells_a_stale_name(span, package, wrong):
    assert (check_span(span, package) is not None) == wrong


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_names_every_part_of_oppu():
    entries = re.findall(r"^  (\S+)", _layout_block(), flags=re.M)
    names = {entry for line in entries for entry in line.split()}
    parts = {p.name + ("/" if p.is_dir() else "") for p in (ROOT / "oppu").iterdir()
             if (p.is_dir() and (p / "__init__.py").exists() or p.suffix == ".py") and p.name != "__init__.py"}
    parts |= {"configs/"}
    assert parts - names == set(), "README.md's layout leaves out these parts of oppu/"


def test_readme_layout_entries_exist():
    """Entries: a name (or names, ``cluster/ k8s/``) at the start of a line, inside ``oppu/`` when
    indented by two spaces; deeper-indented lines continue a description."""
    missing = []
    for line in _layout_block().splitlines():
        if not (entry := re.match(r"( ?|  )(\S+(?: \S+/)*)", line)):
            continue
        folder = ROOT / "oppu" if entry[1] == "  " else ROOT
        missing += [name for name in entry[2].split() if name.endswith(("/", ".py")) and not (folder / name).exists()]
    assert not missing
