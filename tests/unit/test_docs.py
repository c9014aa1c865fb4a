"""The documentation stays true: links resolve, examples parse and validate against the models,
shell snippets are valid bash, the CRD reference is generated, metrics and chart values are
all documented."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

from hyperfleet.operator import metrics
from hyperfleet.reconcilers.jobs.parse import parse_job
from hyperfleet.reconcilers.models.gitsource import GitSourceSpec
from hyperfleet.reconcilers.models.node import WorkerNodeSpec
from hyperfleet.reconcilers.models.pool import VirtualMachinePoolSpec
from hyperfleet.reconcilers.models.vm import VirtualMachineSpec

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md")) + ([REPO / "README.md"] if (REPO / "README.md").exists() else [])
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SPEC_MODELS: dict[str, type[BaseModel]] = {
    "VirtualMachine": VirtualMachineSpec, "WorkerNode": WorkerNodeSpec, "GitSource": GitSourceSpec,
    "VirtualMachinePool": VirtualMachinePoolSpec}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line} ({self.lang})"


def blocks(lang: str | None = None) -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if lang is None or m.group(1) == lang:
                out.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)))
    return out


def prose(text: str) -> str:
    """The page without fenced blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`|\*|_(?=\w)|(?<=\w)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_crd_reference", DOCS / "gen_crd_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documentation_exists() -> None:
    for name in ("index", "architecture", "install", "git-layout", "crd-reference", "operations",
                 "jobs", "metrics", "nix"):
        assert (DOCS / f"{name}.md").is_file(), name
    assert "```mermaid" in (DOCS / "architecture.md").read_text(), "architecture needs its diagram"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, broken


def _validate_object(doc: dict[str, Any]) -> None:
    kind = doc.get("kind")
    if doc.get("apiVersion") != "hyperfleet.dev/v1alpha1":
        return
    assert isinstance(doc.get("metadata", {}).get("name"), str), "metadata.name"
    if kind in SPEC_MODELS:
        SPEC_MODELS[kind].model_validate_json(json.dumps(doc["spec"]), strict=True)
    elif kind == "VmJob":
        parse_job(doc["spec"])
    else:
        pytest.fail(f"unknown Hyperfleet kind {kind}")


@pytest.mark.parametrize("block", blocks("yaml"), ids=str)
def test_yaml_examples_parse_and_validate(block: Block) -> None:
    docs = [d for d in yaml.safe_load_all(block.text) if d is not None]
    assert docs, "empty YAML block"
    for doc in docs:
        if isinstance(doc, dict):
            _validate_object(doc)


def test_yaml_examples_cover_every_kind() -> None:
    kinds = {d.get("kind") for b in blocks("yaml") for d in yaml.safe_load_all(b.text) if isinstance(d, dict)}
    assert {"VirtualMachine", "WorkerNode", "VmJob", "GitSource"} <= kinds


@pytest.mark.parametrize("block", blocks("bash"), ids=str)
def test_bash_snippets_are_valid_bash(block: Block) -> None:
    r = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("block", blocks("python"), ids=str)
def test_python_snippets_compile(block: Block) -> None:
    compile(block.text, str(block), "exec")


@pytest.mark.skipif(not shutil.which("nix-instantiate"),
                    reason="Nix is not installed (apt-get install nix-bin)")
@pytest.mark.parametrize("block", blocks("nix"), ids=str)
def test_nix_snippets_parse(block: Block) -> None:
    r = subprocess.run(["nix-instantiate", "--parse", "-E", block.text], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr


def test_crd_reference_is_up_to_date() -> None:
    gen = load_generator()
    assert (DOCS / "crd-reference.md").read_text() == gen.render(), (
        "docs/crd-reference.md is stale: run .venv/bin/python docs/gen_crd_reference.py")
    text = gen.render()
    for kind in gen.all_kinds():
        assert f"## {kind.kind}\n" in text
        for field in kind.spec_model.model_json_schema(by_alias=True)["properties"]:
            assert f"| `{field}` |" in text, f"{kind.kind}.spec.{field} missing"


def metric_names() -> list[str]:
    """Every series name the processes export: the module's metrics and what its state
    collectors describe (the fleet, per-VM and per-GitSource gauges)."""
    families = [f for obj in vars(metrics).values() if isinstance(obj, MetricWrapperBase)
                for f in obj.describe()]
    view: Any = None
    for collector in (metrics.FleetCollector(view), metrics.NodeVmCollector("n", {}),
                      metrics.GitSourceCollector(view)):
        families += collector.describe()
    return [f.name + ("_total" if f.type == "counter" else "") for f in families]


def test_every_metric_is_documented() -> None:
    text = (DOCS / "metrics.md").read_text()
    names = metric_names()
    assert len(names) > 15, "no metrics found in operator/metrics.py"
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"document these in docs/metrics.md: {missing}"


def test_every_chart_value_is_documented() -> None:
    values = yaml.safe_load((REPO / "charts" / "hyperfleet" / "values.yaml").read_text())
    text = (DOCS / "install.md").read_text()
    paths = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            paths += [f"{key}.{sub}" for sub in value]
        else:
            paths.append(key)
    missing = [p for p in paths if f"`{p}`" not in text and f"`{p}." not in text and f"`{p}`," not in text]
    assert not missing, f"document these chart values in docs/install.md: {missing}"


def test_the_readme_transcript_is_the_recorded_demo() -> None:
    """The README shows docs/demo.cast (an asciicast v2 recording of a real run), line for
    line: re-record it (and paste it) when the demo's output changes."""
    cast = (REPO / "docs" / "demo.cast").read_text().splitlines()
    header = json.loads(cast[0])
    assert header["version"] == 2 and header["width"] > 0
    frames = [json.loads(line) for line in cast[1:]]
    times = [f[0] for f in frames]
    assert times == sorted(times) and all(f[1] == "o" for f in frames)
    recorded = "".join(f[2] for f in frames).replace("\r\n", "\n").splitlines()
    readme = (REPO / "README.md").read_text()
    shown = readme.split("$ make demo\n", 1)[1].split("```", 1)[0].splitlines()
    assert shown and recorded[-1] == "==> all VMs Running"
    for line in shown:
        if "(...)" in line:  # shortened in the README: the rest must still match
            head, tail = line.split("(...)")
            assert any(r.startswith(head) and r.endswith(tail) for r in recorded), line
        else:
            assert line in recorded, line
