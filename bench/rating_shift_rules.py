"""What simple rules score on synthetic LaMP-3 test queries, to read the real model's Table 1 against.

    python3 bench/table1_real.py --task LaMP-3 --seed 1 --out /tmp/l3s1 --stages data
    python3 bench/rating_shift_rules.py --data /tmp/l3s1/data

The generator (``oppu.data.synth.rating``) writes each review with sentiment words of one quality
level and sets the user's score to that level shifted by their own bias. Each rule reads a review's
level from its closing sentiment word (the generator's vocabulary, so this works on its data only)
and answers with no model at all:

- ``copy_retrieved_score``: the score of the history item BM25 ranks first (what RAG k=1 shows);
- ``one_retrieved_shift``: the query's level plus that one item's shift (its score minus its level);
- ``history_median_shift``: the query's level plus the median shift over the visible history (items
  of levels 2-4, whose scores are not clipped), what a personal adapter can learn from dozens of items.

Printed beside the data's population and Bayes references (MAE over the test queries).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

_OVERALL = re.compile(r"Overall it is (.+)\.$")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared synthetic LaMP-3 data directory")
    args = parser.parse_args()

    from oppu.data.dataset import read_dataset
    from oppu.data.synth.vocabulary import QUALITY_WORDS
    from oppu.retrieval import BM25Retriever

    dataset = read_dataset(args.data)
    if dataset.task.name != "LaMP-3":
        raise SystemExit(f"{args.data}: a {dataset.task.name} data set; this check reads LaMP-3 reviews")
    level_of_word = {word: level for level, words in QUALITY_WORDS.items() for word in words}

    def level(text: str) -> int:
        match = _OVERALL.search(text)
        if match is None or match.group(1) not in level_of_word:
            raise SystemExit(f"{args.data}: review not written by the synthetic generator: {text[:80]!r}")
        return level_of_word[match.group(1)]

    errors: dict[str, list[int]] = {"copy_retrieved_score": [], "one_retrieved_shift": [], "history_median_shift": []}
    for user in dataset.test_users():
        retriever = BM25Retriever(dataset.task, user.history)
        for query in user.queries:
            fields = dataset.task.parse_query(query.input)
            gold, query_level = int(query.gold), level(fields["text"])
            top = retriever.top_k(fields, 1, limit=query.visible_history)[0].fields
            one_shift = int(top["score"]) - level(top["text"])
            shifts = sorted(int(h.fields["score"]) - level(h.fields["text"])
                            for h in user.history[:query.visible_history] if 1 < level(h.fields["text"]) < 5)
            median_shift = shifts[len(shifts) // 2] if shifts else one_shift
            errors["copy_retrieved_score"].append(abs(int(top["score"]) - gold))
            errors["one_retrieved_shift"].append(abs(min(5, max(1, query_level + one_shift)) - gold))
            errors["history_median_shift"].append(abs(min(5, max(1, query_level + median_shift)) - gold))
    reference = json.loads((Path(args.data) / "reference.json").read_text())
    figures = {rule: round(statistics.mean(values), 3) for rule, values in errors.items()}
    figures |= {f"reference_{name}": round(reference[name]["MAE"], 3) for name in ("population", "bayes")}
    print(json.dumps({"data": args.data, "queries": len(errors["copy_retrieved_score"]), "MAE": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
