"""The pipeline's DAG as dvc.yaml defines it, read through DVC, cut where the flow
schedules: the flow keeps no stage order of its own.

- ``data[task]``: the stages a task's models need (ingest@, augment@), in order;
- ``branches[key]``: one model's own stages (dvc.yaml's ``foreach: ${train}`` entries of its
  key: train@, evaluate@), in order, the training first;
- ``after[task]``: the stages that need that task's models only (ensemble@, distill@,
  cost@), in order;
- ``joins``: every other stage (the report, which needs both tasks), in order.

A stage added to dvc.yaml lands in one of these by its deps and outs alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plan:
    data: dict[str, list[str]]
    branches: dict[str, list[str]]
    after: dict[str, list[str]]
    joins: list[str]


def read_plan(root: Path, train: Mapping[str, Mapping[str, Any]]) -> Plan:
    """The plan of the project at ``root`` whose params.yaml ``train`` section is ``train``."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = repo.index.graph  # an edge goes from a stage to one it depends on
        graph = nx.DiGraph()
        graph.add_nodes_from(s.name for s in stages.nodes)
        graph.add_edges_from((a.name, b.name) for a, b in stages.edges)
    # upstream first; ties by name, so that the order is the same on every machine
    order = list(reversed(list(nx.lexicographical_topological_sort(graph))))
    branches = {k: [s for s in order if s.partition("@")[2] == k] for k in train}
    own = {s for b in branches.values() for s in b}
    by_task: dict[str, set[str]] = {}
    for key, stages_of_key in branches.items():
        by_task.setdefault(str(train[key]["task"]), set()).update(stages_of_key)
    upstream = {t: set().union(*(nx.descendants(graph, s) for s in b)) for t, b in by_task.items()}
    downstream = {t: set().union(*(nx.ancestors(graph, s) for s in b)) for t, b in by_task.items()}
    data = {t: [s for s in order if s in up - own] for t, up in upstream.items()}
    after = {
        t: [
            s
            for s in order
            if s in down - own and not any(s in d for u, d in downstream.items() if u != t)
        ]
        for t, down in downstream.items()
    }
    placed = own | {s for v in (*data.values(), *after.values()) for s in v}
    return Plan(data, branches, after, [s for s in order if s not in placed])


def stale_stages(root: Path) -> list[str]:
    """The stages ``dvc status`` finds stale in the project at ``root`` now (changed deps,
    params, command or outs; missing outs), by name: what ``dvc repro -s`` would run."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted(repo.status())
