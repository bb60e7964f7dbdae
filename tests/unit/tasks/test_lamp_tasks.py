"""The seven task definitions: prompts, LaMP inputs, training samples, output parsing."""

from __future__ import annotations

import pickle

import pytest

from oppu.errors import ConfigError, DataError
from oppu.tasks import TASK_NAMES, get_task
from oppu.tasks.base import TrainingSample

# One realistic query and one history item per task; the item has every required field.
QUERIES = {
    "LaMP-1": {"title": 'Deep "Residual" Learning', "option1": "ImageNet classification",
               "option2": "Gradient-based learning"},
    "LaMP-2N": {"text": "The senate passed the bill on Tuesday."},
    "LaMP-2M": {"description": "A crew travels through a wormhole."},
    "LaMP-3": {"text": "Broke after two days. Would not buy again."},
    "LaMP-4": {"text": "Stocks rallied as inflation cooled."},
    "LaMP-5": {"abstract": "We study sparse attention for long documents."},
    "LaMP-7": {"text": "I am going to the beach today."},
}
ITEMS = {
    "LaMP-1": {"title": "Attention is all you need", "abstract": "We propose the Transformer."},
    "LaMP-2N": {"text": "Rates rose again.", "title": "Fed hikes", "category": "business"},
    "LaMP-2M": {"description": "Robots rebel.", "tag": "sci-fi"},
    "LaMP-3": {"text": "Great value.", "score": "5"},
    "LaMP-4": {"text": "The team won the cup.", "title": "Cup glory"},
    "LaMP-5": {"abstract": "A new parser.", "title": "Fast Parsing"},
    "LaMP-7": {"text": "beach day!!"},
}
OFFICIAL_INPUTS = {
    "LaMP-1": 'For an author who has written the paper with the title "Deep "Residual" Learning", which '
              'reference is related? Just answer with [1] or [2] without explanation. [1]: "ImageNet '
              'classification" [2]: "Gradient-based learning"',
    "LaMP-2N": "Which category does this article relate to among the following categories? Just answer "
               "with the category name without further explanation. categories: [women, religion, "
               "politics, style & beauty, entertainment, culture & arts, sports, science & technology, "
               "travel, business, crime, education, healthy living, parents, food & drink] article: "
               "The senate passed the bill on Tuesday.",
    "LaMP-2M": "Which tag does this movie relate to among the following tags? Just answer with the tag "
               "name without further explanation. tags: [sci-fi, based on a book, comedy, action, twist "
               "ending, dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, "
               "social commentary, violence, true story] description: A crew travels through a wormhole.",
    "LaMP-3": "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, "
              "4, or 5 without further explanation. review: Broke after two days. Would not buy again.",
    "LaMP-4": "Generate a headline for the following article: Stocks rallied as inflation cooled.",
    "LaMP-5": "Generate a title for the following abstract of a paper: We study sparse attention for "
              "long documents.",
    "LaMP-7": "Paraphrase the following tweet without any explanation before or after it: I am going to "
              "the beach today.",
}

MOVIE_PROMPT_BODY = (
    "Which tag does this movie relate to among the following tags? Just answer with the tag name "
    "without further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, "
    "dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, social "
    "commentary, violence, true story]\n")


def test_registry_lists_the_seven_public_tasks():
    assert TASK_NAMES == ("LaMP-1", "LaMP-2N", "LaMP-2M", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7")


@pytest.mark.parametrize("spelling", ["LaMP-2M", "LaMP_2M", "lamp-2m", " LAMP_2m "])
def test_get_task_accepts_lamp_spellings(spelling):
    assert get_task(spelling).name == "LaMP-2M"
    assert get_task(spelling).lamp_name == "LaMP_2M"


def test_get_task_refuses_unknown_and_private_tasks():
    with pytest.raises(ConfigError, match="LaMP-1, LaMP-2N, LaMP-2M"):
        get_task("LaMP-9")
    with pytest.raises(ConfigError, match="private"):
        get_task("LaMP_6")
    with pytest.raises(ConfigError, match="LaMP-2N is news"):
        get_task("LaMP-2")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_pickles_to_the_registry_instance(name):
    task = get_task(name)
    assert pickle.loads(pickle.dumps(task)) is task
    assert task == get_task(name.replace("-", "_")) and hash(task) == hash(name)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_official_input_parses_to_the_query(name):
    task = get_task(name)
    assert task.lamp_input(QUERIES[name]) == OFFICIAL_INPUTS[name]
    assert task.parse_query(OFFICIAL_INPUTS[name]) == QUERIES[name]
    assert set(task.query_fields) == set(QUERIES[name])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_parse_query_without_the_marker_is_a_data_error(name):
    with pytest.raises(DataError) as caught:
        get_task(name).parse_query("Tell me something about this text: hello")
    assert caught.value.field == "input"


def test_citation_input_with_newlines_between_options_parses():
    text = ('For an author who has written the paper with the title "T", which reference is related? '
            'Just answer with [1] or [2] without explanation.\n[1]: "A"\n[2]: "B"')
    assert get_task("LaMP-1").parse_query(text) == {"title": "T", "option1": "A", "option2": "B"}


def test_movie_prompt_golden_with_profile_and_retrieved_items():
    task = get_task("LaMP-2M")
    prompt = task.build_prompt(QUERIES["LaMP-2M"],
                               retrieved=[ITEMS["LaMP-2M"], {"description": "Two friends.", "tag": "comedy"}],
                               profile="most popular tag: sci-fi")
    assert prompt == (
        "most popular tag: sci-fi\n"
        "description: Robots rebel. tag: sci-fi\n"
        "description: Two friends. tag: comedy\n"
        "\n" + MOVIE_PROMPT_BODY + "description: A crew travels through a wormhole. tag:")


def test_rating_prompt_golden_with_one_retrieved_item():
    prompt = get_task("LaMP-3").build_prompt(QUERIES["LaMP-3"], retrieved=[ITEMS["LaMP-3"]])
    assert prompt == (
        "review: Great value. score: 5\n"
        "\n"
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
        "or 5 without further explanation.\n"
        "review: Broke after two days. Would not buy again. score:")


def test_citation_prompt_golden_without_history():
    prompt = get_task("LaMP-1").build_prompt(QUERIES["LaMP-1"], retrieved=(), profile=None)
    assert prompt == (
        "Identify the most relevant reference for the listed publication by the researcher. Select the "
        "reference paper that is most closely related to the researcher's work. Please respond with "
        "only the number that corresponds to the reference.\n"
        'paper title: Deep "Residual" Learning\n'
        "reference: [1] - ImageNet classification [2] - Gradient-based learning\n"
        "answer:")


PROMPT_ENDINGS = {
    "LaMP-1": "reference: [1] - ImageNet classification [2] - Gradient-based learning\nanswer:",
    "LaMP-2N": "religion]\narticle: The senate passed the bill on Tuesday. category:",
    "LaMP-2M": "true story]\ndescription: A crew travels through a wormhole. tag:",
    "LaMP-3": "without further explanation.\nreview: Broke after two days. Would not buy again. score:",
    "LaMP-4": "Generate a headline for the following article.\narticle: Stocks rallied as inflation cooled. headline:",
    "LaMP-5": "Generate a title for the following abstract of a paper.\nabstract: We study sparse "
              "attention for long documents. title:",
    "LaMP-7": "Following the given pattern, paraphrase the following text into tweet without any "
              "explanation before or after it.\ntext: I am going to the beach today. tweet:",
}
RENDERED_ITEMS = {
    "LaMP-1": "paper title: Attention is all you need\n",
    "LaMP-2N": "article: Rates rose again. category: business\n",
    "LaMP-2M": "description: Robots rebel. tag: sci-fi\n",
    "LaMP-3": "review: Great value. score: 5\n",
    "LaMP-4": "article: The team won the cup. headline: Cup glory\n",
    "LaMP-5": "abstract: A new parser. title: Fast Parsing\n",
    "LaMP-7": "tweet: beach day!!\n",
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_prompt_layout_profile_then_history_then_task_prompt(name):
    task = get_task(name)
    bare = task.build_prompt(QUERIES[name])
    assert bare.endswith(PROMPT_ENDINGS[name]) and "\n\n" not in bare
    full = task.build_prompt(QUERIES[name], retrieved=[ITEMS[name]], profile="PROFILE")
    assert full == "PROFILE\n" + RENDERED_ITEMS[name] + "\n" + bare
    assert task.build_prompt(QUERIES[name], profile="PROFILE") == "PROFILE\n" + bare


@pytest.mark.parametrize("name", ["LaMP-2N", "LaMP-2M", "LaMP-3", "LaMP-4", "LaMP-5"])
def test_supervised_history_sample_is_the_items_prompt_and_output(name):
    task = get_task(name)
    item = ITEMS[name]
    sample = task.history_sample(item, retrieved=[ITEMS[name]], profile="P")
    assert sample == TrainingSample(
        prompt=task.build_prompt(task.item_query(item), retrieved=[ITEMS[name]], profile="P"),
        target=" " + item[task.output_field])
    assert not task.trains_on_next_token


@pytest.mark.parametrize(("name", "text"), [
    ("LaMP-1", "paper title: Attention is all you need abstract: We propose the Transformer."),
    ("LaMP-7", "tweet: beach day!!"),
])
def test_next_token_history_sample_is_the_history_text(name, text):
    task = get_task(name)
    assert task.trains_on_next_token and task.item_query(ITEMS[name]) is None
    assert task.history_sample(ITEMS[name], retrieved=[ITEMS[name]], profile="P") == TrainingSample("", text)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_history_item_with_a_missing_or_mistyped_field_is_a_data_error(name):
    task = get_task(name)
    field = task.item_fields[0]
    missing = {k: v for k, v in ITEMS[name].items() if k != field}
    with pytest.raises(DataError) as caught:
        task.history_sample(missing)
    assert caught.value.field == field
    with pytest.raises(DataError) as caught:
        task.history_sample({**ITEMS[name], field: 5})
    assert caught.value.field == field


def test_query_sample_targets_the_gold_after_a_space():
    task = get_task("LaMP-2M")
    sample = task.query_sample(QUERIES["LaMP-2M"], "dystopia")
    assert sample.prompt == task.build_prompt(QUERIES["LaMP-2M"]) and sample.target == " dystopia"


@pytest.mark.parametrize(("name", "generation", "prediction"), [
    ("LaMP-2M", " sci-fi", "sci-fi"),
    ("LaMP-2M", "Dark Comedy\ndescription: more text", "dark comedy"),
    ("LaMP-2M", "dark comedy, because it is funny", "dark comedy"),
    ("LaMP-2M", "comedy.", "comedy"),
    ("LaMP-2M", "horror", "horror"),
    ("LaMP-2N", "Science & Technology", "science & technology"),
    ("LaMP-1", " [2]", "[2]"),
    ("LaMP-1", "1", "[1]"),
    ("LaMP-1", "[1] - ImageNet classification", "[1]"),
    ("LaMP-1", "12 references", "12 references"),
    ("LaMP-2M", "comedyish", "comedyish"),
    ("LaMP-3", " 4", "4"),
    ("LaMP-3", "I would give it 2 stars", "2"),
    ("LaMP-3", "excellent", "excellent"),
    ("LaMP-4", "  Stocks rally\nmore", "Stocks rally"),
    ("LaMP-4", "headline: Stocks rally", "Stocks rally"),
    ("LaMP-5", "Title: Sparse Attention", "Sparse Attention"),
    ("LaMP-7", "tweet: beach time!", "beach time!"),
])
def test_parse_output(name, generation, prediction):
    assert get_task(name).parse_output(generation) == prediction


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_declares_its_metrics_and_budgets(name):
    task = get_task(name)
    assert set(task.higher_is_better) == set(task.metric_names)
    assert task.primary_metric == task.metric_names[0]
    assert task.max_new_tokens > 0 and task.default_epochs in (2, 3)
    assert (task.labels is None) == (task.kind == "generation")
    assert task.retrieval_document(ITEMS[name]) == RENDERED_ITEMS[name]
    query_words = task.retrieval_query(QUERIES[name]).split()
    assert all(word in query_words for word in " ".join(QUERIES[name].values()).split()[:3])


def test_profile_prompts_follow_appendix_i():
    assert get_task("LaMP-3").profile_prompt([ITEMS["LaMP-3"], {"text": "Meh.", "score": "2"}]) == (
        "Based on this user’s past reviews, what are the most common scores they give for positive and "
        "negative reviews? Answer in the following form: most common positive score: <most common "
        "positive score>, most common negative score: <most common negative score>. User History: "
        "review: Great value. score: 5 | review: Meh. score: 2 Answer:")
    for name in TASK_NAMES:
        prompt = get_task(name).profile_prompt([ITEMS[name]])
        assert prompt.endswith(f"User History: {RENDERED_ITEMS[name].strip()} Answer:")
