"""Every command of the ```bash blocks of README.md and docs/cluster.md, and the usage lines of the
jobs/*.py docstrings, checked without running it.

What each kind of command gets (tests/docs_blocks.py splits the blocks into commands):

- ``oppu SUB ...``: parsed by the ``oppu`` parser (``oppu.cli.build_parser``), flags and all;
- ``python jobs/X.py ...`` (alone or after ``ray job submit ... --``): the script exists, its
  flags parse as ``oppu.commands.stages.job_main`` parses them (or as the script's own
  ``parser()`` does, where it has one: jobs/migrate_users.py), and ``--config`` + every ``--set``
  load into a valid ``RunConfig`` (unknown keys, bad values fail);
- ``python -c CODE`` (also inside ``$(...)``): CODE compiles; ``python -m cluster.local_cluster
  SUB``: the subcommand and its arguments parse; ``python -m pytest PATHS``: the paths exist;
- ``ray job submit --runtime-env F``, ``ray up|dashboard|down F``, ``serve deploy F``: F exists and
  is YAML; a Serve config's ``import_path`` and ``serve run``'s name a ``def`` that exists;
- a command that is a repo script (``cluster/local-up.sh``): it exists and is executable;
- any word naming a repo file (``cluster/``, ``k8s/``, ``jobs/``, ``oppu/``, ...): it exists.

Not checked here: commands of other tools (pip, git, moto_server, curl, docker, kubectl) beyond the
files they name, and whether a command succeeds — tests/integration/test_doc_walkthrough.py runs
docs/cluster.md §1 whole, block by block, and README's blocks run in test_readme_blocks.py and
test_readme_jobs.py.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
from pathlib import Path

import pytest
import yaml

from tests.docs_blocks import ROOT, Block, Command, bash_blocks, commands

DOCS = ("README.md", "docs/cluster.md")
REPO_DIRS = ("cluster/", "k8s/", "jobs/", "oppu/", "serve_apps/", "configs/", "bench/", "tests/", "docs/")
MADE_BY_THE_DOCS = {"k8s/secret-s3.yaml"}  # `cp k8s/secret-s3.example.yaml k8s/secret-s3.yaml` in §4


def _usage_blocks() -> list[Block]:
    """The indented command lines of each jobs/*.py docstring (what ``--help`` shows)."""
    blocks = []
    for script in sorted((ROOT / "jobs").glob("*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text()), clean=False) or ""
        usage = [line for line in doc.splitlines() if line.startswith("    ")]
        blocks.append(Block(f"jobs/{script.name}", "docstring", 1, "\n".join(usage), None))
    return blocks


def _all_commands() -> list[Command]:
    blocks = [block for doc in DOCS for block in bash_blocks(ROOT / doc)] + _usage_blocks()
    return [c for block in blocks for c in commands(block)]


ALL = _all_commands()


def _id(command: Command) -> str:
    return f"{command.block.file}:{command.block.line}:{' '.join(command.argv[:3])[:40]}"


@pytest.mark.parametrize("command", ALL, ids=[_id(c) for c in ALL])
def test_documented_command(command):
    _check_repo_paths(command.argv)
    _check(command.argv)


def _check(argv: list[str]) -> None:
    program, rest = argv[0], argv[1:]
    if program == "oppu":
        _check_oppu(rest)
    elif program in ("python", "python3"):
        _check_python(rest)
    elif program == "ray":
        _check_ray(rest)
    elif program == "serve":
        _check_serve(rest)
    elif "/" in program and not program.startswith(("/", "<")):
        assert os.access(ROOT / program, os.X_OK), f"{program} is not an executable file of the repo"


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{parser.prog} {' '.join(argv)}: {err.getvalue().strip()}") from exc


def _check_oppu(argv: list[str]) -> None:
    from oppu.cli import COMMANDS, build_parser

    assert argv and argv[0] in COMMANDS, f"no oppu command {argv[:1]}"
    _parse(build_parser(argv), argv)


def _check_job(script: str, argv: list[str]) -> None:
    from oppu import logs
    from oppu.commands.stages import add_threshold_arguments, threshold_overrides
    from oppu.config import add_config_arguments, load_config
    from oppu.pipeline import STAGE_COMMANDS
    from oppu.run_config import RunConfig

    assert (ROOT / script).is_file(), script
    parser = _job_parser(script)
    if parser is None:
        parser = argparse.ArgumentParser(prog=script)
        add_config_arguments(parser)
        add_threshold_arguments(parser, STAGE_COMMANDS.get(Path(script).stem.replace("_", "-"), []))
        logs.add_arguments(parser)
    args = _parse(parser, argv)
    assert args.config, f"{script} without --config"
    # raises on a bad key or value
    load_config(RunConfig, ROOT / args.config, args.overrides + threshold_overrides(args))


def _job_parser(script: str) -> argparse.ArgumentParser | None:
    """The script's own ``parser()``, where it defines one (imported: its work is under ``__main__``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_doc_job_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser() if hasattr(module, "parser") else None


def _check_python(argv: list[str]) -> None:
    if argv[0] == "-c":
        compile(argv[1], "<python -c>", "exec")
    elif argv[0] == "-m" and argv[1] == "cluster.local_cluster":
        from cluster import local_cluster

        with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(io.StringIO()):
            local_cluster.main([*argv[2:], "--help"])  # parses up to --help, runs nothing
        assert exited.value.code == 0
    elif argv[0] == "-m" and argv[1] == "pytest":
        for path in (a for a in argv[2:] if a.startswith("tests")):
            assert (ROOT / path).exists(), path
    elif argv[0] == "-m":
        assert argv[1] in ("pip",), f"unchecked module {argv[1]}"
    elif argv[0].startswith("bench/"):
        source = (ROOT / argv[0]).read_text()  # a missing script fails here
        for flag in (a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{argv[0]} has no option {flag}"
    else:
        assert argv[0].startswith("jobs/"), f"unchecked script {argv[0]}"
        _check_job(argv[0], argv[1:])


def _check_ray(argv: list[str]) -> None:
    if argv[:2] == ["job", "submit"]:
        assert "--" in argv, "ray job submit without -- ENTRYPOINT"
        options, entrypoint = argv[2:argv.index("--")], argv[argv.index("--") + 1:]
        if "--runtime-env" in options:
            _load_yaml(options[options.index("--runtime-env") + 1])
        assert entrypoint[0] in ("python", "python3"), entrypoint
        _check_python(entrypoint[1:])
    elif argv[0] in ("up", "dashboard", "down"):
        _load_yaml(argv[1])


def _check_serve(argv: list[str]) -> None:
    if argv[0] == "deploy":
        config = _load_yaml(argv[1])
        for app in config["applications"]:
            _check_import_path(app["import_path"])
    elif argv[0] == "run":
        _check_import_path(argv[1])


def _load_yaml(path: str) -> dict:
    assert (ROOT / path).is_file(), path
    return yaml.safe_load((ROOT / path).read_text())


def _check_import_path(import_path: str) -> None:
    module, name = import_path.split(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), import_path
    defined = {n.name for n in ast.parse(source.read_text()).body
               if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert name in defined, import_path


def _check_repo_paths(argv: list[str]) -> None:
    for word in argv:
        for value in (word, word.partition("=")[2]):
            if value.startswith(REPO_DIRS) and value not in MADE_BY_THE_DOCS:
                assert (ROOT / value.rstrip("/")).exists(), f"{value} does not exist"


def test_the_blocks_a_reader_runs_are_all_found():
    """The extraction finds the commands the issue names (so the test above cannot go empty)."""
    found = {(c.block.file, c.block.heading, " ".join(c.argv[:2])) for c in ALL}
    section = "1. A local 3-node cluster with S3, from an empty machine"
    for expected in [("README.md", "Quickstart", "oppu quickstart"),
                     ("README.md", "Using real LaMP files", "oppu prepare"),
                     ("README.md", "Using real LaMP files", "oppu score"),
                     ("README.md", "Serving personalized models", "serve run"),
                     ("README.md", "Running the stages as Ray jobs", "oppu synth"),
                     ("README.md", "Running the stages as Ray jobs", "ray job"),
                     ("README.md", "Running the stages as Ray jobs", "oppu train-users"),
                     ("docs/cluster.md", section, "oppu synth"),
                     ("docs/cluster.md", section, "python jobs/train_base.py"),
                     ("docs/cluster.md", section, "oppu publish"),
                     ("docs/cluster.md", section, "ray job"),
                     ("docs/cluster.md", section, "serve deploy")]:
        assert expected in found, expected
    assert len(ALL) > 60
    assert sum(c.block.heading == "docstring" for c in ALL) == 5  # one usage line per job


def test_cluster_walkthrough_publishes_every_base_its_jobs_read():
    """docs/cluster.md §1: train_base makes a base for every flavour the train_users job's variants
    and the serve app need, in the run dir `oppu publish` uploads to the one they read (issue 20:
    the walkthrough uploaded `data` and `base` only, and every rag-k1+oppu actor died)."""
    from oppu.config import load_config
    from oppu.preflight import required_inputs
    from oppu.run_config import RunConfig

    section = [c for c in ALL if c.block.file == "docs/cluster.md" and c.block.heading.startswith("1.")]

    def job(script: str) -> RunConfig:
        argv = next(c.argv for c in section if script in c.argv)
        argv = argv[argv.index(script) + 1:]
        parser = argparse.ArgumentParser()
        from oppu.config import add_config_arguments

        add_config_arguments(parser)
        args = parser.parse_args(argv)
        return load_config(RunConfig, ROOT / args.config, args.overrides)

    base, users = job("jobs/train_base.py"), job("jobs/train_users.py")
    publish = next(c.argv for c in section if c.argv[:2] == ["oppu", "publish"])
    assert publish[publish.index("--run") + 1] == base.run_dir
    assert publish[publish.index("--to") + 1] == users.run_dir
    needed = {i.uri.rsplit("/", 1)[1] for i in required_inputs(users, ["users"])}
    made = {base.base_uri(f).rsplit("/", 1)[1] for f in base.base.flavours} | {"data"}
    assert needed <= made, needed - made
    serve = _load_yaml(next(c.argv[2] for c in section if c.argv[:2] == ["serve", "deploy"]))
    assert serve["applications"][0]["args"]["model"] == f"{users.run_dir}/base"


def test_readme_jobs_blocks_take_their_tests_substitutions():
    """README "Running the stages as Ray jobs" still names the ports, temp dir and slow-machine
    ``--set``s that tests/integration/test_readme_jobs.py puts in (it runs the blocks; this checks,
    in a second, that the section and the test still agree)."""
    from tests.doc_runs import PORT_FLAGS, at_smallest, one_node_cluster, smallest
    from tests.integration.test_readme_jobs import script

    ports = {flag: 1000 + i for i, flag in enumerate(PORT_FLAGS)}
    text = script(ports)
    assert "ray start --head --port 1000 --dashboard-port 1001" in text
    assert text.count("--set base.flavours=[plain]") == 6
    # the user-life section's job block (test_readme_blocks.py): that cluster, the sets after its last line
    assert one_node_cluster(ports).splitlines()[1].startswith("ray start --head --port 1000 --dashboard-port 1001")
    (block,) = [b for b in bash_blocks(ROOT / "README.md") if "users.users=" in b.text]
    job, staged = at_smallest(block.text)
    assert staged == 1 and job.endswith(f"users.users=[newbie,user07] {smallest()}"), job
