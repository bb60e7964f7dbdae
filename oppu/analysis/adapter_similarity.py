"""``adapter-similarity`` (Figure 7, Appendix F): pairwise cosine similarity of users' adapters.

Per Appendix F, each tensor of two adapters is flattened, the cosine of every pair of
corresponding tensors taken, and the cosines averaged over tensors. Users are ordered by cluster:
the planted persona where the synthetic reference records one, else agglomerative clusters of
the similarity matrix. No training: the adapters are the run's own, read from its store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from oppu.analysis.report import SuiteResult, markdown_table, new_figure
from oppu.errors import ConfigError
from oppu.run_config import RunConfig

log = logging.getLogger(__name__)

NAME = "adapter-similarity"
TITLE = "Cosine similarity between users' adapters"


def adapter_cosine_matrix(adapters: Mapping[str, Mapping[str, object]]) -> tuple[list[str], list[list[float]]]:
    """(users, matrix) of Appendix F's similarity: for every key two adapters share, the cosine
    of the flattened tensors, averaged over those keys."""
    import torch

    users = list(adapters)
    matrix = [[0.0] * len(users) for _ in users]
    for i, first in enumerate(users):
        for j in range(i, len(users)):
            second = users[j]
            shared = [key for key in adapters[first] if key in adapters[second]]
            if not shared:
                raise ConfigError(f"adapters of {first!r} and {second!r} share no tensor: were they "
                                  "trained with the same PEFT config?")
            cosines = [torch.nn.functional.cosine_similarity(
                adapters[first][key].flatten().double(), adapters[second][key].flatten().double(), dim=0)
                for key in shared]
            matrix[i][j] = matrix[j][i] = float(torch.stack(cosines).mean())
    return users, matrix


def lora_deltas(adapter: Mapping[str, object]) -> dict[str, object]:
    """{module: B @ A}, the weight change each LoRA module makes (scaling left out: it is the same
    for every user and cancels in a cosine). Empty for adapters that are not LoRA."""
    deltas = {}
    for key, a_matrix in adapter.items():
        if ".lora_A." in key:
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key in adapter:
                deltas[key.replace(".lora_A.", ".")] = adapter[b_key].double() @ a_matrix.double()
    return deltas


def load_adapters(cfg: RunConfig, variant: str, flavour: str = "plain") -> dict[str, dict]:
    """The newest adapter of ``variant`` of every user in the run's store, as tensors."""
    from safetensors.torch import load as load_safetensors

    from oppu.models import base_fingerprint
    from oppu.store import AdapterKey, AdapterStore

    store = AdapterStore(cfg.store_uri)
    fingerprint = base_fingerprint(cfg.base_uri(flavour))
    adapters = {}
    for user in sorted(store.users(cfg.task, fingerprint, variant)):
        _, files = store.read_files(AdapterKey(cfg.task, fingerprint, variant, user))
        adapters[user] = load_safetensors(files["adapter_model.safetensors"])
    return adapters


def planted_clusters(cfg: RunConfig, users: list[str]) -> dict[str, str] | None:
    """user -> planted persona from the synthetic reference, when it records one for every user."""
    from oppu import fsutil

    uri = fsutil.join(cfg.data_uri, "reference.json")
    if not fsutil.exists(uri):
        return None
    planted = fsutil.read_json(uri).get("users", {})
    if not all("persona" in planted.get(u, {}) for u in users):
        return None
    return {u: str(planted[u]["persona"]) for u in users}


def fitted_clusters(users: list[str], matrix: list[list[float]], n_clusters: int) -> dict[str, str]:
    """Agglomerative clusters of the users on distance 1 - similarity (no planted structure known)."""
    import numpy as np
    from sklearn.cluster import AgglomerativeClustering

    if len(users) < 2:
        return {u: "cluster 0" for u in users}
    distance = 1.0 - np.asarray(matrix)
    labels = AgglomerativeClustering(n_clusters=min(n_clusters, len(users)), metric="precomputed",
                                     linkage="average").fit_predict(distance)
    return {u: f"cluster {label}" for u, label in zip(users, labels, strict=True)}


def within_across(users: list[str], matrix: list[list[float]], clusters: Mapping[str, str]) -> dict:
    """Mean similarity of pairs in the same cluster and of pairs in different clusters."""
    within, across = [], []
    for i in range(len(users)):
        for j in range(i + 1, len(users)):
            (within if clusters[users[i]] == clusters[users[j]] else across).append(matrix[i][j])
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {"within": mean(within), "across": mean(across), "n_within_pairs": len(within),
            "n_across_pairs": len(across)}


def run(cfg: RunConfig, variant: str = "oppu", n_clusters: int = 5) -> tuple[SuiteResult, object]:
    started = time.perf_counter()
    adapters = load_adapters(cfg, variant)
    if len(adapters) < 2:
        raise ConfigError(f"adapter-similarity needs at least 2 users' '{variant}' adapters in "
                          f"{cfg.store_uri}; found {len(adapters)} (train them first)")
    users, matrix = adapter_cosine_matrix(adapters)
    # Appendix F compares A and B tensors as stored; users whose LoRA starts from different random
    # A matrices then look unrelated even with the same update, so the cosine of the weight change
    # B @ A (the same space for every user) is reported beside it.
    deltas = {u: lora_deltas(a) for u, a in adapters.items()}
    delta_matrix = adapter_cosine_matrix(deltas)[1] if all(deltas.values()) else None
    clusters = planted_clusters(cfg, users)
    source = "planted persona (synthetic reference)"
    if clusters is None:
        clusters, source = fitted_clusters(users, matrix, n_clusters), "agglomerative clustering"
    order = sorted(range(len(users)), key=lambda i: (clusters[users[i]], users[i]))
    ordered_users = [users[i] for i in order]
    ordered = [[matrix[i][j] for j in order] for i in order]
    summary = within_across(users, matrix, clusters)
    delta_summary = within_across(users, delta_matrix, clusters) if delta_matrix else None
    log.info(f"[{NAME}] {len(users)} users, {variant}: Appendix F within-cluster {summary['within']}, "
             f"across {summary['across']}; weight change B@A: {delta_summary}")

    panels = [("cosine similarity (Appendix F: A and B as stored)", ordered)]
    if delta_matrix:
        panels.append(("cosine similarity of the weight change B@A",
                       [[delta_matrix[i][j] for j in order] for i in order]))
    figure, axes = new_figure(7.5 * len(panels), 6.2, columns=len(panels))
    axes = axes if len(panels) > 1 else [axes]
    tick_labels = [f"{u} ({clusters[u]})" for u in ordered_users]
    for panel, (label, values) in zip(axes, panels, strict=True):
        # The diagonal (1.0) is left blank so the colour scale spans the pairs that differ.
        shown = [[float("nan") if i == j else value for j, value in enumerate(row)] for i, row in enumerate(values)]
        image = panel.imshow(shown, cmap="viridis")
        figure.colorbar(image, ax=panel, label=label)
        panel.set_xticks(range(len(users)), tick_labels, rotation=90, fontsize=6)
        panel.set_yticks(range(len(users)), tick_labels, fontsize=6)
        panel.set_xlabel("user (ordered by cluster)")
        panel.set_ylabel("user (ordered by cluster)")
        _outline_clusters(panel, [clusters[u] for u in ordered_users])
    figure.suptitle(f"{cfg.task}: similarity of personal '{variant}' adapters (clusters: {source})")
    figure.tight_layout()

    delta = delta_summary or {"within": "–", "across": "–"}
    rows = [["same cluster", summary["within"], delta["within"], summary["n_within_pairs"]],
            ["different clusters", summary["across"], delta["across"], summary["n_across_pairs"]]]
    section = (f"{len(users)} test users' `{variant}` adapters from the run's store; clusters: {source}.\n\n"
               + markdown_table(["user pairs", "mean cosine (Appendix F)", "mean cosine of B@A", "pairs"], rows)
               + "\n\nThe heatmap orders users by cluster; outlined squares are clusters.")
    data = {"task": cfg.task, "variant": variant, "n_users": len(users), "cluster_source": source,
            "users": ordered_users, "clusters": {u: clusters[u] for u in ordered_users},
            "matrix": ordered, **summary, "weight_change": delta_summary,
            "weight_change_matrix": ([[delta_matrix[i][j] for j in order] for i in order]
                                     if delta_matrix else None)}
    return SuiteResult(NAME, TITLE, section, data, time.perf_counter() - started), figure


def _outline_clusters(axes, labels: list[str]) -> None:
    from matplotlib.patches import Rectangle

    start = 0
    for position in range(1, len(labels) + 1):
        if position == len(labels) or labels[position] != labels[start]:
            size = position - start
            axes.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False,
                                     edgecolor="white", linewidth=1.2,
                                     label="cluster" if start == 0 else None))
            start = position
    axes.legend(loc="upper right", fontsize=7)
