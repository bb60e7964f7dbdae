"""``training-cost`` (Appendix B, Figure 8): one user's training time against the number of
history items and the tokens per item.

As Appendix B does, one user's items are set to a fixed number of whitespace tokens (the
item's longest input field is cut or repeated to length) while the number of items varies, then
the item count is fixed while the tokens per item vary; each point trains that user's adapter
once on the run's plain base with the run's settings (timed, not published). The run's own
per-user training times (its ``train_users`` report) are shown beside them when present.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time

from oppu import fsutil
from oppu.analysis.report import SuiteResult, markdown_table, new_figure
from oppu.data.records import HistoryItem, UserData
from oppu.run_config import RunConfig
from oppu.tasks.base import Task

log = logging.getLogger(__name__)

NAME = "training-cost"
TITLE = "Training cost per user"


def sized_history(task: Task, user: UserData, n_items: int, tokens_per_item: int) -> UserData:
    """``user`` with ``n_items`` items (cycled), each item's longest input field set to exactly
    ``tokens_per_item`` whitespace tokens."""
    text_fields = [f for f in task.item_fields if f != task.output_field]
    history = []
    for i in range(n_items):
        source = user.history[i % len(user.history)]
        longest = max(text_fields, key=lambda f: len(source.fields[f].split()))
        words = source.fields[longest].split() or ["item"]
        fields = {**source.fields, longest: " ".join(words[j % len(words)] for j in range(tokens_per_item))}
        history.append(HistoryItem(f"{source.id}-{i}", fields, source.date))
    return dataclasses.replace(user, history=history)


def linear_fit(x: list[float], y: list[float]) -> dict:
    """Least-squares line and its R² (how linear the growth is)."""
    import numpy as np

    slope, intercept = np.polyfit(x, y, 1)
    predicted = slope * np.asarray(x) + intercept
    total = float(((np.asarray(y) - np.mean(y)) ** 2).sum())
    r2 = 1 - float(((np.asarray(y) - predicted) ** 2).sum()) / total if total else 1.0
    return {"slope_s": float(slope), "intercept_s": float(intercept), "r2": r2}


def run(cfg: RunConfig, items: tuple[int, ...] = (5, 10, 20, 40), tokens: tuple[int, ...] = (10, 25, 50, 100),
        fixed_tokens: int = 50, fixed_items: int = 10):
    from oppu.data.dataset import read_dataset
    from oppu.models import load_model
    from oppu.training.personal import train_user_adapter
    from oppu.training.samples import personal_samples

    started = time.perf_counter()
    dataset = read_dataset(cfg.data_uri)
    task = dataset.task
    user = max(dataset.test_users(), key=lambda u: (len(u.history), u.user_id))
    model, tokenizer = load_model(cfg.base_uri("plain"))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    epochs = cfg.users.optim.epochs or task.default_epochs
    peft_config = cfg.users.peft.to_peft_config()

    def seconds_for(n_items: int, n_tokens: int) -> float:
        sized = sized_history(task, user, n_items, n_tokens)
        with tempfile.TemporaryDirectory(prefix="oppu-cost-") as out_dir:
            stats = train_user_adapter(model, tokenizer, personal_samples(task, sized), peft_config,
                                       cfg.users.optim, epochs, cfg.seed, user.user_id, out_dir)
        log.info(f"[{NAME}] {n_items} items x {n_tokens} tokens: {stats.seconds:.2f}s")
        return stats.seconds

    by_items = [seconds_for(n, fixed_tokens) for n in items]
    by_tokens = [seconds_for(fixed_items, n) for n in tokens]
    fits = {"items": linear_fit(list(items), by_items), "tokens": linear_fit(list(tokens), by_tokens)}
    observed = _observed(cfg)

    figure, (left, right) = new_figure(11, 4.2, columns=2)
    left.plot(items, by_items, marker="o", label=f"{fixed_tokens} tokens per item (R²={fits['items']['r2']:.2f})")
    if observed:
        left.scatter([o["samples"] for o in observed], [o["seconds"] for o in observed], marker="x",
                     color="gray", label="this run's users (own histories)")
    left.set_xlabel("history items")
    left.set_ylabel("training time per user (s)")
    left.set_title("time against history items")
    left.legend(fontsize=8)
    right.plot(tokens, by_tokens, marker="o", color="tab:orange",
               label=f"{fixed_items} items (R²={fits['tokens']['r2']:.2f})")
    right.set_xlabel("whitespace tokens per history item")
    right.set_ylabel("training time per user (s)")
    right.set_title("time against tokens per item")
    right.legend(fontsize=8)
    figure.suptitle(f"{task.name}: personal adapter training cost ({epochs} epochs, {cfg.users.peft.method})")

    rows = [[f"{n} items x {fixed_tokens} tokens", s] for n, s in zip(items, by_items, strict=True)]
    rows += [[f"{fixed_items} items x {n} tokens", s] for n, s in zip(tokens, by_tokens, strict=True)]
    section = (f"User {user.user_id}'s items resized; one training each on this machine.\n\n"
               + markdown_table(["history", "seconds"], rows)
               + f"\n\nLinear fit: {fits['items']['slope_s']:.3f} s per item (R² {fits['items']['r2']:.2f}), "
                 f"{fits['tokens']['slope_s']:.4f} s per token of an item (R² {fits['tokens']['r2']:.2f}).")
    data = {"task": task.name, "user": user.user_id, "epochs": epochs, "items": list(items),
            "seconds_by_items": by_items, "fixed_tokens": fixed_tokens, "tokens": list(tokens),
            "seconds_by_tokens": by_tokens, "fixed_items": fixed_items, "fits": fits, "observed": observed}
    return SuiteResult(NAME, TITLE, section, data, time.perf_counter() - started), figure


def _observed(cfg: RunConfig) -> list[dict]:
    from oppu.training.users_report import load_report, report_path

    if not fsutil.exists(report_path(cfg.run_dir, "oppu")):
        return []
    return [{"user": u["user_id"], "samples": u["samples"], "seconds": u["seconds"]}
            for u in load_report(cfg.run_dir, "oppu")["users"] if u["status"] == "trained"]
