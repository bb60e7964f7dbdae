"""The seven public LaMP tasks, one definition each.

Prompts are Appendix H of the OPPU paper word for word; official ``input`` texts are LaMP's;
item renderings, retrieval queries and profile prompts (Appendix I) follow the OPPU authors'
``prompt/prompt.json`` and ``prompt/prompt_profile.json``.
"""

from __future__ import annotations

from functools import partial

from oppu.metrics.lamp import classification_scores, generation_scores, rating_scores
from oppu.tasks.base import NextTokenHistory, SupervisedHistory, Task
from oppu.tasks.decisions import LeastAbsoluteErrorLabel, MostLikelyLabel
from oppu.tasks.labels import LAMP_1_LABELS, LAMP_2M_LABELS, LAMP_2N_LABELS, LAMP_3_LABELS
from oppu.tasks.outputs import LabelParser, TextParser, parse_rating
from oppu.tasks.queries import CitationQuery, MarkerQuery

_ACCURACY_F1 = ("accuracy", "f1")
_MAE_RMSE = ("MAE", "RMSE")
_ROUGE = ("rouge-1", "rouge-L")
_HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "MAE": False, "RMSE": False,
                     "rouge-1": True, "rouge-L": True}


def _higher_is_better(metric_names: tuple[str, str]) -> dict[str, bool]:
    return {name: _HIGHER_IS_BETTER[name] for name in metric_names}


def _profile_instruction(request: str) -> str:
    return request + " User History: {history} Answer:"


# The paper's text mangles the apostrophe of "researcher's"; the authors' prompt.json has "'".
_CITATION_INSTRUCTION = (
    "Identify the most relevant reference for the listed publication by the researcher. "
    "Select the reference paper that is most closely related to the researcher's work. "
    "Please respond with only the number that corresponds to the reference.")

LAMP_1 = Task(
    name="LaMP-1",
    lamp_name="LaMP_1",
    kind="classification",
    labels=LAMP_1_LABELS,
    item_fields=("title", "abstract"),
    output_field=None,
    metric_names=_ACCURACY_F1,
    higher_is_better=_higher_is_better(_ACCURACY_F1),
    max_new_tokens=8,
    default_epochs=3,
    query_format=CitationQuery(),
    prompt_template=(_CITATION_INSTRUCTION + "\npaper title: {title}\n"
                     "reference: [1] - {option1} [2] - {option2}\nanswer:"),
    item_template="paper title: {title}\n",
    retrieval_query_template=_CITATION_INSTRUCTION + "\npaper title: {title}",
    history_rule=NextTokenHistory("paper title: {title} abstract: {abstract}"),
    output_parser=LabelParser(LAMP_1_LABELS, aliases={"1": "[1]", "2": "[2]"}),
    scorer=partial(classification_scores, labels=LAMP_1_LABELS),
    label_decision=MostLikelyLabel(),
    profile_instruction=_profile_instruction(
        "Write a summary, in English, of the research interests and topics of a researcher who has "
        "published the following papers. Only generate the summary, no other text."),
)

_NEWS_QUESTION = "Which category does this article relate to among the following categories?"
_NEWS_ANSWER_RULE = "Just answer with the category name without further explanation."

LAMP_2N = Task(
    name="LaMP-2N",
    lamp_name="LaMP_2N",
    kind="classification",
    labels=LAMP_2N_LABELS,
    item_fields=("text", "title", "category"),
    output_field="category",
    metric_names=_ACCURACY_F1,
    higher_is_better=_higher_is_better(_ACCURACY_F1),
    max_new_tokens=16,
    default_epochs=3,
    query_format=MarkerQuery(
        # LaMP's own input lists the categories in another order than the paper's prompt below.
        instruction=(f"{_NEWS_QUESTION} {_NEWS_ANSWER_RULE} categories: [women, religion, politics, "
                     "style & beauty, entertainment, culture & arts, sports, science & technology, "
                     "travel, business, crime, education, healthy living, parents, food & drink] "
                     "article: "),
        marker="] article: ",
        field="text",
    ),
    prompt_template=(f"{_NEWS_QUESTION} {_NEWS_ANSWER_RULE} categories: [travel, education, parents, "
                     "style & beauty, entertainment, food & drink, science & technology, business, "
                     "sports, healthy living, women, politics, crime, culture & arts, religion]\n"
                     "article: {text} category:"),
    item_template="article: {text} category: {category}\n",
    # The authors' query reads "arcicle:", a typo that only dropped one token from BM25's query.
    retrieval_query_template=_NEWS_QUESTION + " article: {text}",
    history_rule=SupervisedHistory("category"),
    output_parser=LabelParser(LAMP_2N_LABELS),
    scorer=partial(classification_scores, labels=LAMP_2N_LABELS),
    label_decision=MostLikelyLabel(),
    profile_instruction=_profile_instruction(
        "Look at the following past articles this journalist has written and determine the most "
        "popular category they write in. Answer in the following form: most popular category: "
        "<category>."),
)

_MOVIE_QUESTION = ("Which tag does this movie relate to among the following tags? "
                   "Just answer with the tag name without further explanation.")
_MOVIE_TAGS = ("tags: [sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, "
               "classic, psychology, fantasy, romance, thought-provoking, social commentary, violence, "
               "true story]")

LAMP_2M = Task(
    name="LaMP-2M",
    lamp_name="LaMP_2M",
    kind="classification",
    labels=LAMP_2M_LABELS,
    item_fields=("description", "tag"),
    output_field="tag",
    metric_names=_ACCURACY_F1,
    higher_is_better=_higher_is_better(_ACCURACY_F1),
    max_new_tokens=16,
    default_epochs=3,
    query_format=MarkerQuery(instruction=f"{_MOVIE_QUESTION} {_MOVIE_TAGS} description: ",
                             marker="] description: ", field="description"),
    prompt_template=f"{_MOVIE_QUESTION} {_MOVIE_TAGS}\n" + "description: {description} tag:",
    item_template="description: {description} tag: {tag}\n",
    retrieval_query_template=_MOVIE_QUESTION + "\ndescription: {description}",
    history_rule=SupervisedHistory("tag"),
    output_parser=LabelParser(LAMP_2M_LABELS),
    scorer=partial(classification_scores, labels=LAMP_2M_LABELS),
    label_decision=MostLikelyLabel(),
    profile_instruction=_profile_instruction(
        "Look at the following past movies this user has watched and determine the most popular tag "
        "they labeled. Answer in the following form: most popular tag: <tag>."),
)

_REVIEW_QUESTION = "What is the score of the following review on a scale of 1 to 5?"
_REVIEW_ANSWER_RULE = "just answer with 1, 2, 3, 4, or 5 without further explanation."

LAMP_3 = Task(
    name="LaMP-3",
    lamp_name="LaMP_3",
    kind="rating",
    labels=LAMP_3_LABELS,
    item_fields=("text", "score"),
    output_field="score",
    metric_names=_MAE_RMSE,
    higher_is_better=_higher_is_better(_MAE_RMSE),
    max_new_tokens=4,
    default_epochs=3,
    query_format=MarkerQuery(instruction=f"{_REVIEW_QUESTION} {_REVIEW_ANSWER_RULE} review: ",
                             marker="without further explanation. review: ", field="text"),
    prompt_template=f"{_REVIEW_QUESTION} {_REVIEW_ANSWER_RULE}\n" + "review: {text} score:",
    item_template="review: {text} score: {score}\n",
    retrieval_query_template=_REVIEW_QUESTION + " review: {text}",
    history_rule=SupervisedHistory("score"),
    output_parser=parse_rating,
    scorer=rating_scores,
    label_decision=LeastAbsoluteErrorLabel(),
    # Appendix I.4 as printed ends in an extraction error; this is its repaired form.
    profile_instruction=_profile_instruction(
        "Based on this user’s past reviews, what are the most common scores they give for positive "
        "and negative reviews? Answer in the following form: most common positive score: <most "
        "common positive score>, most common negative score: <most common negative score>."),
)

LAMP_4 = Task(
    name="LaMP-4",
    lamp_name="LaMP_4",
    kind="generation",
    labels=None,
    item_fields=("text", "title"),
    output_field="title",
    metric_names=_ROUGE,
    higher_is_better=_higher_is_better(_ROUGE),
    max_new_tokens=48,
    default_epochs=2,
    query_format=MarkerQuery(instruction="Generate a headline for the following article: ",
                             marker="Generate a headline for the following article: ", field="text"),
    prompt_template="Generate a headline for the following article.\narticle: {text} headline:",
    item_template="article: {text} headline: {title}\n",
    retrieval_query_template="Generate a headline for the following article: {text}",
    history_rule=SupervisedHistory("title"),
    output_parser=TextParser(("headline:",)),
    scorer=generation_scores,
    profile_instruction=_profile_instruction(
        "Given this author’s previous articles, try to describe a template for their headlines. I "
        "want to be able to accurately predict the headline gives one of their articles. Be specific "
        "about their style and wording, don’t tell me anything generic."),
)

LAMP_5 = Task(
    name="LaMP-5",
    lamp_name="LaMP_5",
    kind="generation",
    labels=None,
    item_fields=("abstract", "title"),
    output_field="title",
    metric_names=_ROUGE,
    higher_is_better=_higher_is_better(_ROUGE),
    max_new_tokens=48,
    default_epochs=2,
    query_format=MarkerQuery(
        instruction="Generate a title for the following abstract of a paper: ",
        marker="Generate a title for the following abstract of a paper: ", field="abstract"),
    prompt_template="Generate a title for the following abstract of a paper.\nabstract: {abstract} title:",
    item_template="abstract: {abstract} title: {title}\n",
    retrieval_query_template="Generate a title for the following abstract of a paper: {abstract}",
    history_rule=SupervisedHistory("title"),
    output_parser=TextParser(("title:",)),
    scorer=generation_scores,
    profile_instruction=_profile_instruction(
        "Given this author’s previous publications, try to describe a template for their titles. I "
        "want to be able to accurately predict the title of one of the papers from the abstract. "
        "Only generate the template description, nothing else."),
)

_TWEET_INPUT_LEAD = "Paraphrase the following tweet without any explanation before or after it: "

LAMP_7 = Task(
    name="LaMP-7",
    lamp_name="LaMP_7",
    kind="generation",
    labels=None,
    item_fields=("text",),
    output_field=None,
    metric_names=_ROUGE,
    higher_is_better=_higher_is_better(_ROUGE),
    max_new_tokens=64,
    default_epochs=2,
    query_format=MarkerQuery(instruction=_TWEET_INPUT_LEAD, marker=_TWEET_INPUT_LEAD, field="text"),
    prompt_template=("Following the given pattern, paraphrase the following text into tweet without "
                     "any explanation before or after it.\ntext: {text} tweet:"),
    item_template="tweet: {text}\n",
    retrieval_query_template=("Paraphrase the following text into tweet without any explanation "
                              "before or after it: {text}"),
    history_rule=NextTokenHistory("tweet: {text}"),
    output_parser=TextParser(("tweet:",)),
    scorer=generation_scores,
    # Appendix I.7 is cut off in our copy of the paper; this is the OPPU authors' own profile
    # prompt for the task (prompt/prompt_profile.json), in the style of I.5 and I.6.
    profile_instruction=_profile_instruction(
        "Given this person’s previous tweets, try to describe a template for their tweets. I want to "
        "take a generic sentence and rephrase it to sound like one of their tweets, with the same "
        "style/punctuation/capitalization/wording/tone/etc. as them. Only give me the template "
        "description, nothing else."),
)

ALL_TASKS = (LAMP_1, LAMP_2N, LAMP_2M, LAMP_3, LAMP_4, LAMP_5, LAMP_7)
