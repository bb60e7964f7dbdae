"""Label sets of LaMP's classification and rating tasks, in the OPPU evaluator's order."""

LAMP_1_LABELS = ("[1]", "[2]")

LAMP_2N_LABELS = (
    "food & drink", "sports", "education", "parents", "religion", "travel", "business", "crime",
    "science & technology", "culture & arts", "entertainment", "politics", "women",
    "style & beauty", "healthy living",
)

LAMP_2M_LABELS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)

LAMP_3_LABELS = ("1", "2", "3", "4", "5")
