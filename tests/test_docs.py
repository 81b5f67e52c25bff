"""Every code block of the README and of docs/ runs as written, or is checked, or says why it is not run.

- ``python`` blocks run: each page's blocks in order, in one namespace (in a temporary folder).
- ``bash`` blocks: every ``lightning-meta`` command is checked (``fit``/``test``/``validate`` parse with
  their config, ``predict`` options exist; one short-name command is trained). Any other command in a
  block needs an HTML comment right above it, ``<!-- not run: why -->``.
- ``yaml`` blocks parse.

A command that appears on several pages (the README's Quick start and docs/getting-started.md) is tested once.
"""

import ast
import functools
import graphlib
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from episode_factory import make_episodes

from datamodules import Omniglot
from lightning_meta import MAML, ProtoNet
from lightning_meta.cli import make_cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
TEXT = {page: page.read_text() for page in PAGES}
SCRIPT = Path(sys.executable).parent / "lightning-meta"
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]+?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", flags=re.S)


def name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def blocks(page: Path, lang: str) -> list[tuple[str, str | None]]:
    """``(body, why_not_run)`` of the page's ``lang`` blocks, in order."""
    return [(m["body"], m["why"]) for m in FENCE.finditer(TEXT[page]) if m["lang"] == lang]


@functools.cache
def namespace(page: Path) -> dict:
    """Run the page's Python blocks in order in one namespace and return it (the examples write no files)."""
    namespace: dict = {}
    for body, _ in blocks(page, "python"):
        exec(compile(body, name(page), "exec"), namespace)  # the examples assert what they show
    return namespace


def lines(body: str) -> list[list[str]]:
    """The block's commands as words, continuation lines joined, comments dropped."""
    return [words for line in body.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


def lightning_meta_words(words: list[str]) -> list[str] | None:
    """The arguments of the ``lightning-meta`` command on a line, if it has one."""
    for i, word in enumerate(words):
        if word.rsplit("/", 1)[-1] == "lightning-meta":
            rest = words[i + 1 :]
            return rest[: rest.index("&&")] if "&&" in rest else rest
    return None


def commands() -> list[list[str]]:
    """Every ``lightning-meta`` command in the README's and the docs' bash blocks, each once."""
    found: list[list[str]] = []
    for page in PAGES:
        for body, _ in blocks(page, "bash"):
            for words in lines(body):
                command = lightning_meta_words(words)
                if command is not None and command not in found:
                    found.append(command)
    return found


PYTHON_PAGES = [page for page in PAGES if blocks(page, "python")]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=name)
def test_python_blocks_run(page):
    assert namespace(page)


def test_python_examples_are_not_copied_between_pages():
    bodies = [body for page in PAGES for body, _ in blocks(page, "python")]
    assert len(bodies) >= 15, "the docs lost their Python examples"
    assert len(set(bodies)) == len(bodies), "a Python block appears twice: keep one copy and link to it"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_bash_blocks_run_only_checked_commands_or_say_why_not(page):
    for body, why in blocks(page, "bash"):
        others = [w for w in lines(body) if w[0].rsplit("/", 1)[-1] != "lightning-meta" or "&&" in w]
        assert why or not others, f"{name(page)}: mark this block <!-- not run: why -->: {body}"


def test_yaml_blocks_parse():
    found = [body for page in PAGES for body, _ in blocks(page, "yaml")]
    assert found
    for body in found:
        assert isinstance(yaml.safe_load(body), dict), body


def test_every_docs_page_is_in_the_site_navigation():
    config = (REPO / "mkdocs.yml").read_text()
    for page in PAGES[1:]:
        assert f": {page.relative_to(REPO / 'docs').as_posix()}\n" in config, f"{name(page)} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("package", ["lightning_meta", "datamodules"])
def test_api_reference_lists_every_public_name(package):
    """A name added to a package's ``__all__`` gets its API page entry (rendered from its docstring)."""
    module = importlib.import_module(package)
    page = (REPO / "docs" / "api" / f"{package}.md").read_text()
    names = [n for n in module.__all__ if not inspect.ismodule(getattr(module, n))]
    missing = [n for n in names if f"::: {package}.{n}\n" not in page]
    assert not missing, f"add '::: {package}.NAME' entries to docs/api/{package}.md for {missing}"


def test_docs_method_example_trains(fake_omniglot):
    model = namespace(REPO / "docs/extending/method.md")["NearestNeighbour"]()
    dm = Omniglot(root=str(fake_omniglot), ways=2, shots=2, queries=3, rotations=False, val_episodes=4)
    trainer = pl.Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False)
    trainer.fit(model, dm)
    assert 0 <= trainer.callback_metrics["val/acc"] <= 1


def test_docs_anil_backbone_and_inner_optimizer_examples_take_a_training_step():
    extending = {k: v for page in (REPO / "docs/extending").glob("*.md") for k, v in namespace(page).items()}
    batch = make_episodes(tasks=2, ways=5, shots=1, queries=2, shape=(1, 28, 28))
    anil = extending["HeadOnlyMAML"]().train()
    before = {n: p.detach().clone() for n, p in anil.named_parameters()}
    anil.training_step(batch, 0).backward()
    assert all(p.grad is not None for p in anil.parameters())  # the body is meta-learned too
    assert list(anil.adapt_params()) == ["head.weight", "head.bias"]
    assert all(torch.equal(before[n], p) for n, p in anil.named_parameters())
    tiny = ProtoNet(extending["TinyNet"]())
    tiny.training_step(batch, 0).backward()
    sign = MAML(extending["TinyNet"](), head=torch.nn.Linear(32, 5), inner_optimizer=extending["SignSGD"](0.01))
    sign.training_step(batch, 0).backward()
    assert sign.head.weight.grad is not None


def test_readme_quick_start_comes_first_and_names_real_files():
    assert TEXT[README].split("\n## ")[1].startswith("Quick start")
    quick_start = TEXT[README].split("## Quick start")[1].split("\n## ")[0]
    for config in re.findall(r"--config (\S+)", quick_start):
        assert (REPO / config).exists(), config


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_exist(page):
    """Links from a page to files (mkdocs build --strict checks the docs' links and anchors again)."""
    targets = re.findall(r"\]\(([^)#\s]+)\)", TEXT[page])
    for target in (t for t in targets if not re.match(r"[a-z]+:", t)):
        assert (page.parent / target).exists(), f"{name(page)}: {target}"


def test_the_docs_keep_their_pictures():
    assert any(re.search(r"!\[[^]]*\]\([^)]+\.png\)", text) for text in TEXT.values()), "the docs lost their pictures"


@pytest.mark.parametrize("words", [c for c in commands() if c[0] in ("fit", "test", "validate")], ids=" ".join)
def test_cli_commands_parse(words, tmp_path, monkeypatch, capsys):
    """Every fit/test command's config exists and every key it sets is accepted (nothing is run)."""
    monkeypatch.chdir(tmp_path)
    for i, word in enumerate(words):
        if word == "--config":
            words[i + 1] = str(REPO / words[i + 1])
            assert Path(words[i + 1]).exists(), words[i + 1]
    words = [w for w in words if w not in ("best", "last")]
    words = [w for w in words if w != "--ckpt_path"]
    with pytest.raises(SystemExit) as done:
        make_cli([*words, "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err


def test_predict_commands_have_the_documented_options():
    predict = [c for c in commands() if c[0] == "predict"]
    assert predict, "the docs lost their predict command"
    out = subprocess.run([str(SCRIPT), "predict", "--help"], capture_output=True, text=True, timeout=120)
    for option in (w for command in predict for w in command if w.startswith("--")):
        assert option in out.stdout, option


def test_short_name_sinusoid_command_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = next(c for c in commands() if "--model" in c and "Sinusoid" in c)
    cli = make_cli([*words, "--trainer.enable_progress_bar", "false"])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 5
    # Meta-learned: three inner steps of lr 0.01 halve the query loss of the learned initialisation
    # (measured 3.34 -> 1.78); with the default inner_lr 0.4 the run diverged to 6e16.
    assert metrics["val/loss"] < 0.7 * metrics["val_adapt/loss_step_0"], metrics


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_sinusoid_command_with_the_default_inner_lr_stops_with_an_error_naming_it(precision, tmp_path):
    # docs/training/cli.md: "MAML's `inner_lr: 0.4` diverges on sinusoid regression [...], and the run then stops
    # with an error that names `inner_lr`". Its command without `--model.inner_lr 0.01`, task batching
    # left to `auto` and the precision given both ways (bf16-mixed is the default on CPUs with AMX).
    assert "and the run then stops with an error that names `inner_lr`" in " ".join(
        TEXT[REPO / "docs/training/cli.md"].split()
    )
    words = next(c for c in commands() if "--model" in c and "Sinusoid" in c)
    at = words.index("--model.inner_lr")
    words = [*words[:at], *words[at + 2 :], "--trainer.max_epochs", "2"]
    command = [str(SCRIPT), *words, "--trainer.enable_progress_bar", "false", "--trainer.precision", precision]
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_META_DEBUG"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(errors) == 1 and "training diverged" in errors[0], done.stderr[-3000:]
    assert "MAML's inner_lr=0.4 is likely too large for this data; configs/maml/sinusoid.yaml uses 0.01" in errors[0]
    assert not list(tmp_path.rglob("interrupted.ckpt"))  # a diverged model is not saved for resuming


def test_importing_the_packages_does_not_import_learn2learn():
    code = "import sys, lightning_meta, datamodules, lightning_meta.cli; assert 'learn2learn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def room_of(module: str) -> str:
    """The room of a dotted module name: a top-level module or subpackage of lightning_meta or datamodules."""
    return ".".join(module.split(".")[:2])


def test_no_import_runs_upward():
    """docs/architecture.md: datamodules imports nothing of lightning_meta; the rooms import each other in no circle."""
    graph: dict[str, set[str]] = {}
    for package in ("lightning_meta", "datamodules"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                continue  # a package's __init__ re-exports its rooms; it is no room of its own
            room, where = room_of(".".join(parts)), parts[:-1]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = list(where[: len(where) - node.level + 1]) if node.level else []
                    names = [".".join([*base, node.module]) if node.module else ".".join(base)]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    target = room_of(name)
                    if name.split(".")[0] in ("lightning_meta", "datamodules") and "." in target and target != room:
                        graph.setdefault(room, set()).add(target)
    assert graph, "no imports found: the scan is broken"
    upward = sorted(f"{room} -> {target}" for room, targets in graph.items() for target in targets
                    if room.startswith("datamodules") and target.startswith("lightning_meta"))  # fmt: skip
    assert not upward, f"datamodules imports lightning_meta: {upward}"
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"rooms import each other in a circle: {' -> '.join(err.args[1])}")
