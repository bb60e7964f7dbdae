"""The analysis suites on a small real run (synthetic LaMP-2M, tiny model, local Ray), and the
paper's planted-structure bars they must show:

- users who share a planted persona have more similar adapters than users who do not;
- with only the least relevant history, OPPU k=0 beats RAG k=1;
- OPPU beats the non-personalized base at every activity level, for users held out of the base
  and of the tiny model's pretraining (that the gain *grows* with history length does not hold at
  this size without leaked answers: an expected failure, see below);
- no test query's answer is in any text a model was trained on before it was evaluated.

Plus PAG end to end: statistical profiles, the profile base, ``pag+oppu`` adapters, evaluation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

# The smallest base that still answers with tags (60 pretraining steps and 300 base samples
# answer every query with punctuation, so no method scores above 0).
TINY = ["tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=4",
        "tiny.intermediate_size=128", "tiny.vocab_size=800", "tiny.pretrain_steps=150",
        "base.optim.epochs=2", "base.max_samples=600", "users.optim.epochs=2",
        "users.actors=2", "users.users_per_batch=1", "eval.actors=1", "ray.num_cpus=2",
        "users.variants=[oppu]",
        # the settings these bars were established with (quickstart.yaml's personal LoRA and base
        # rate have since grown for the full-size tiny model); the suites are what is under test
        "base.optim.lr=3e-3", "users.peft.r=8", "users.peft.alpha=8", "users.peft.target_modules=[q_proj,v_proj]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with both bases and every test user's ``oppu`` adapter, as quickstart leaves it."""
    import ray

    from oppu import cli
    from oppu.config import load_config, to_dict
    from oppu.pipeline import PACKAGED_CONFIGS, run_stages
    from oppu.run_config import RunConfig

    out = tmp_path_factory.mktemp("analysis-run")
    lamp = out / "data" / "lamp"
    assert cli.main(["synth", "--task", "LaMP-2M", "--users", "24", "--seed", "5", "--n-test", "8",
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", "LaMP-2M", "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", "8", "--out", str(out / "data")]) == 0
    shutil.copyfile(lamp / "reference.json", out / "data" / "reference.json")
    cfg = load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml", ["task=LaMP-2M", f"run_dir={out}", *TINY])
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    try:
        run_stages(cfg, ["base", "users"])
        yield out
    finally:
        ray.shutdown()


def _suite(run_dir: Path, name: str, **options) -> dict:
    from oppu.analysis import SuiteOptions, run_suite
    from oppu.analysis.runs import load_run_config

    written = run_suite(name, load_run_config(str(run_dir)), SuiteOptions(**options))
    assert Path(written["png"]).stat().st_size > 10_000
    assert f"(`{name}`)" in Path(written["report"]).read_text()
    return json.loads(Path(written["json"]).read_text())


def test_users_sharing_a_persona_have_more_similar_adapters(run_dir):
    result = _suite(run_dir, "adapter-similarity")
    print("adapter-similarity: Appendix F", {k: result[k] for k in ("within", "across", "n_within_pairs")},
          "weight change B@A", result["weight_change"])
    assert result["n_users"] == 8 and result["cluster_source"].startswith("planted persona")
    assert result["n_within_pairs"] > 0
    # Appendix F's cosine of the stored A and B tensors is near 0 for every pair here (each user's
    # LoRA starts from its own random A), so the planted structure is asserted on the weight change.
    assert result["weight_change"]["within"] > result["weight_change"]["across"] + 0.05


def test_with_only_irrelevant_history_oppu_beats_rag(run_dir):
    result = _suite(run_dir, "behaviour-shift", users=6)
    accuracy = {m: s["accuracy"] for m, s in result["methods"].items()}
    print("behaviour-shift:", accuracy)
    assert result["relevance"].startswith("lexical fallback")
    assert accuracy["OPPU k=0"] > accuracy["RAG k=1"]


def test_pag_end_to_end_with_statistical_profiles(run_dir, tmp_path):
    import ray

    from oppu import cli
    from oppu.analysis.runs import load_run_config, sub_run, write_sub_dataset
    from oppu.data.dataset import read_dataset
    from oppu.pipeline import run_stages
    from oppu.profiles import STATISTICAL_MARK, read_profiles

    assert cli.main(["profiles", "--run", str(run_dir), "--writer", "statistical"]) == 0
    profiles = read_profiles(str(run_dir / "data"), "statistical")
    dataset = read_dataset(run_dir / "data")
    assert set(profiles) == {u.user_id for u in dataset.users}
    assert all(text.startswith(STATISTICAL_MARK) for text in profiles.values())

    cfg = load_run_config(str(run_dir), overrides=["base.flavours=[profile,profile+rag-k1]",
                                                    "users.variants=[pag+oppu,pag+rag-k1+oppu]",
                                                    "eval.methods=[pag,pag+rag-k1,pag+oppu,pag+rag-k1+oppu]"])
    sub = sub_run(cfg, "pag-test", link_bases=())
    write_sub_dataset(sub, cfg.task, dataset.base_users() + dataset.test_users()[:2], {})
    try:
        metrics = run_stages(sub, ["base", "users", "evaluate"])
    finally:
        ray.shutdown()
    provenance = json.loads((Path(sub.run_dir) / "base-profile" / "oppu-base.json").read_text())
    assert provenance["flavour"] == "profile" and provenance["profile_writer"] == "statistical"
    assert set(metrics["methods"]) == {"pag", "pag+rag-k1", "pag+oppu", "pag+rag-k1+oppu"}
    assert not metrics["errors"]
    for variant in ("pag+oppu", "pag+rag-k1+oppu"):
        assert list(Path(sub.store_uri).glob(f"LaMP-2M/*/{variant}/*/*/manifest.json")), variant
    # PAG + RAG reads the base adapted with the profile and one retrieved item in its prompts.
    provenance = json.loads((Path(sub.run_dir) / "base-profile+rag-k1" / "oppu-base.json").read_text())
    assert (provenance["flavour"], provenance["rag_k"]) == ("profile+rag-k1", 1)


@pytest.fixture(scope="module")
def activity(run_dir):
    """The activity suite in its clean mode, the one ``oppu analyze`` runs by default and the
    README's figures use: the held-out users' sub run pretrains its own tiny model and adapts its
    own bases on the other users only. (``activity_fresh_pretrained=False`` would start from the
    main run's pretrained model, which read the held-out users' test answers where they were base
    users of the main run: tests/unit/analysis/test_leakage.py shows that leak.)"""
    return _suite(run_dir, "activity", buckets=2, per_bucket=3, activity_base_samples=600,
                  activity_fresh_pretrained=True)


def test_oppu_beats_non_personalized_at_every_activity_level(activity):
    gains = list(activity["oppu_gain"].values())
    print("activity:", activity["series"], activity["history_lengths"], activity["pretrained"])
    assert activity["pretrained"].startswith("a tiny model pretrained without them")
    # Accuracy moves in steps of one query (1/15 here); measured 2026-12-06: +2/15 in both buckets.
    assert all(gain > 1e-6 for gain in gains), activity["oppu_gain"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "At CI size, in the leak-free mode, OPPU's gain does not grow with history length (measured "
    "2026-12-06: +2/15 for 10-22 items and +2/15 for 29-150 items). The gain grew (0 -> 2/15) only "
    "while this test reused the main run's pretrained model, which had read the short bucket's "
    "test answers. With the shipped personal LoRA (r=16 on every linear layer, 5 epochs, base lr "
    "6e-3) it shrinks (+6/15 -> +5/15); with 4 users per bucket every method scores the same. "
    "Strict: if it starts to pass, turn this back into a plain test."))
def test_oppu_gain_grows_with_history_length(activity):
    gains = list(activity["oppu_gain"].values())
    assert gains[-1] > gains[0] + 1e-6, activity["oppu_gain"]


def test_no_test_answer_in_any_text_a_model_was_trained_on(run_dir, activity):
    """Every test query of the main run and of the activity suite's sub run against every text
    its models were trained on before it was evaluated: the tiny model's pretraining corpus (the
    one that reproduces the build hash recorded in the model), the base samples of each flavour
    (checked against the base's provenance) and the user's own personal samples."""
    from oppu.analysis.activity import FLAVOURS, VARIANTS, sub_config
    from oppu.analysis.leakage import find_leaks, run_training_texts
    from oppu.analysis.runs import load_run_config
    from oppu.data.dataset import read_dataset

    main = load_run_config(str(run_dir))
    sub = sub_config(main, base_max_samples=600, fresh_pretrained=True)
    for cfg, variants in ((main, main.users.variants), (sub, VARIANTS)):
        dataset = read_dataset(cfg.data_uri)
        shared, personal = run_training_texts(cfg, FLAVOURS, variants, pretraining_candidates=[main.data_uri])
        assert [source.split(" ")[0] for source in shared] == ["pretraining", "base-plain", "base-rag"]
        assert next(iter(shared)) == f"pretraining ({cfg.data_uri})"  # each run pretrained on its own base users
        n_queries = sum(len(u.queries) for u in dataset.test_users())
        leaks = find_leaks(dataset.task, dataset.test_users(), shared, personal)
        print(cfg.run_dir, n_queries, "test queries;", {k: len(v) for k, v in shared.items()}, "leaks:", len(leaks))
        assert n_queries > 0 and all(len(texts) > 0 for texts in shared.values())
        assert leaks == [], [(leak.user_id, leak.query_id, leak.source) for leak in leaks[:5]]
    assert activity["leak_check"]["leaked_queries"] == 0 and activity["leak_check"]["test_queries"] > 0
