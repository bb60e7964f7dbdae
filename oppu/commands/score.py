"""``oppu score``: LaMP's metrics for a predictions file against a golds file."""

from __future__ import annotations

import argparse
import json

HELP = "Score LaMP predictions against golds (both in LaMP's outputs format) and print the metrics as JSON."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="LaMP-1, LaMP-2N, LaMP-2M, LaMP-3, LaMP-4, LaMP-5 or LaMP-7")
    parser.add_argument("--golds", required=True, help='golds JSON: {"task": ..., "golds": [{"id", "output"}]}')
    parser.add_argument("--preds", required=True, help="predictions JSON in the same format, same ids")


def run(args: argparse.Namespace) -> int:
    from oppu.evaluation.scoring import score_files
    from oppu.tasks import get_task

    task = get_task(args.task)
    scores = score_files(task, args.golds, args.preds)
    print(json.dumps(scores))
    return 0
