"""Which model each node of the inventory gets from a bundle that may carry several.

An engine node's engine loads one model: the one its inventory entry names in ``models`` (one
name), else the bundle's default (first) model. An SSH node receives that model's files and no
other model's; one with only the gateway role receives no model files (its engine nodes report
their tokenizers). The local node, the installer's own machine, keeps every model (hard links of
the verified files, no copy): its release is the base delta bundles are verified against.
A node naming a model the bundle does not carry, or more than one, is refused before anything is
verified or written, naming the node, the model and the models the bundle has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airgap_bundle import BundleError, inspect_bundle
from airgap_bundle.bundle_models import BundleModel, models_in_manifest
from installer.inventory import Inventory
from installer.preflight import FAIL, PASS, PreflightCheck

CHECK_NAME = "models"


@dataclass(frozen=True)
class ModelPlan:
    """The bundle's models (default first) and the model each engine node loads."""

    models: tuple[BundleModel, ...]
    by_node: dict[str, BundleModel | None]  # None: a node without the engine role

    @property
    def default(self) -> BundleModel:
        return self.models[0]

    def node_files(self, node: str, files: list[dict[str, str]]) -> list[dict[str, str]]:
        """The release files (install.py's entries) that go to ``node``: every file that is no
        model's, and the files of the model it loads."""
        model_files = {f for m in self.models for f in m.files}
        loads = self.by_node[node]
        own = set(loads.files) if loads is not None else set()
        return [f for f in files if f["src"] not in model_files or f["src"] in own]

    def appliance_model(self, node: str) -> dict[str, str]:
        """appliance.yaml's ``model`` for ``node``: its engine's model, or for a gateway-only node the
        default model (named there for the gateway's own use; its files are not on that node)."""
        model = self.by_node[node] or self.default
        return {"name": model.name, "path": model.path}


def node_model_problems(inv: Inventory, models: list[BundleModel]) -> list[str]:
    """What is wrong with the inventory's ``models`` for a bundle carrying ``models``; [] when fine."""
    names = [m.name for m in models]
    if not models:
        return ["expected the bundle to carry at least one model, found none"]
    problems = []
    for node in inv.engine_nodes:
        wanted = node.models or [names[0]]
        if len(wanted) != 1:
            problems.append(f"node {node.name}: expected one model (its engine loads one model; give each model "
                            f"its own engine node), found {wanted}")
        for name in wanted:
            if name not in names:
                problems.append(f"node {node.name} serves model {name!r}: expected one of the models the bundle "
                                f"carries ({', '.join(names)}), found no model of that name")
    return problems


def plan_node_models(inv: Inventory, models: list[BundleModel]) -> ModelPlan:
    """The plan, or ValueError listing every problem (node_model_problems)."""
    problems = node_model_problems(inv, models)
    if problems:
        raise ValueError("; ".join(problems))
    by_name = {m.name: m for m in models}
    return ModelPlan(tuple(models), {n.name: by_name[(n.models or [models[0].name])[0]] if n.is_engine else None
                                     for n in inv.nodes})


def declared_models(bundle: Path) -> list[BundleModel] | None:
    """The models a bundle's manifest lists, read WITHOUT trusting it (a preflight look; install
    checks the signed manifest again after verification). None when it cannot be read: then
    verification says what is wrong with the bundle."""
    try:
        manifest: Any = inspect_bundle(bundle).get("manifest")
        return models_in_manifest(manifest)
    except (BundleError, ValueError):
        return None


def check_node_models(inv: Inventory, bundle: Path) -> PreflightCheck:
    """Preflight: every engine node names one model the bundle carries."""
    models = declared_models(bundle)
    if models is None:
        return PreflightCheck(CHECK_NAME, PASS, f"{bundle}: no readable model list (verification will check the "
                                                "bundle)")
    problems = node_model_problems(inv, models)
    if problems:
        return PreflightCheck(CHECK_NAME, FAIL, "; ".join(problems),
                              "name in each engine node's models: one of the bundle's models, or build the bundle "
                              "with that model (airgap-bundle build --model DIR ...)")
    served = ", ".join(f"{n.name}: {(n.models or [models[0].name])[0]}" for n in inv.engine_nodes)
    return PreflightCheck(CHECK_NAME, PASS, f"bundle carries {', '.join(m.name for m in models)}; engine nodes "
                                            f"serve {served}")
