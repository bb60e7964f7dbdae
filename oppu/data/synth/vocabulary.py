"""The synthetic corpus's closed vocabulary: keyword lists per label or topic, and filler.

Every text the generator writes is built from these lists (plus the task's label names), so a
tokenizer trained on the corpus covers it and a tiny model can learn which words are evidence for
which label. Keyword lists are disjoint across labels within a task: a word is evidence for one
label only.
"""

from __future__ import annotations

# The first word of each list is the label's own genre word, the way real descriptions say "a
# romantic comedy" or "based on the novel"; every item carries it for each of its candidate labels,
# so a tiny model can find the candidates by copying rather than by a large learnt lexicon.
MOVIE_TAG_KEYWORDS: dict[str, tuple[str, ...]] = {
    "sci-fi": ("sci-fi", "spaceship", "alien", "robot", "planet"),
    "based on a book": ("book", "novel", "author", "chapter", "bestseller"),
    "comedy": ("comedy", "jokes", "hilarious", "prank", "clown"),
    "action": ("action", "explosion", "chase", "commando", "stunt"),
    "twist ending": ("twist", "reveal", "secret", "mystery", "clue"),
    "dystopia": ("dystopia", "regime", "rebellion", "surveillance", "wasteland"),
    "dark comedy": ("dark", "absurd", "morbid", "funeral", "cynical"),
    "classic": ("classic", "timeless", "vintage", "legendary", "masterpiece"),
    "psychology": ("psychology", "obsession", "therapist", "paranoia", "trauma"),
    "fantasy": ("fantasy", "wizard", "dragon", "kingdom", "sorcery"),
    "romance": ("romance", "lovers", "kiss", "wedding", "sweetheart"),
    "thought-provoking": ("thought-provoking", "philosophy", "moral", "dilemma", "ethics"),
    "social commentary": ("social", "inequality", "poverty", "injustice", "protest"),
    "violence": ("violence", "brutal", "bloody", "massacre", "revenge"),
    "true story": ("true", "biography", "historical", "veteran", "survivor"),
}

NEWS_CATEGORY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "food & drink": ("food", "recipe", "chef", "restaurant", "wine"),
    "sports": ("sports", "league", "coach", "playoff", "stadium"),
    "education": ("education", "school", "teacher", "classroom", "students"),
    "parents": ("parents", "toddler", "parenting", "baby", "daycare"),
    "religion": ("religion", "church", "faith", "prayer", "pastor"),
    "travel": ("travel", "airline", "passport", "vacation", "hotel"),
    "business": ("business", "startup", "investor", "revenue", "merger"),
    "crime": ("crime", "police", "arrest", "suspect", "robbery"),
    "science & technology": ("science", "smartphone", "software", "laboratory", "satellite"),
    "culture & arts": ("culture", "museum", "painter", "gallery", "theater"),
    "entertainment": ("entertainment", "celebrity", "actress", "singer", "premiere"),
    "politics": ("politics", "senator", "election", "congress", "campaign"),
    "women": ("women", "feminist", "sisterhood", "equality", "empowerment"),
    "style & beauty": ("style", "fashion", "makeup", "runway", "hairstyle"),
    "healthy living": ("healthy", "workout", "nutrition", "yoga", "wellness"),
}

RESEARCH_TOPIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    "vision": ("image", "pixel", "segmentation", "camera", "detection", "video", "convolution", "visual", "scene",
               "depth"),
    "language": ("text", "translation", "sentence", "parsing", "grammar", "dialogue", "summarization", "lexicon",
                 "corpus", "syntax"),
    "robotics": ("manipulator", "gripper", "locomotion", "actuator", "trajectory", "navigation", "servo", "arm",
                 "legged", "drone"),
    "databases": ("query", "index", "transaction", "schema", "storage", "join", "relational", "sql", "table",
                  "replication"),
    "security": ("encryption", "malware", "attack", "privacy", "authentication", "vulnerability", "firewall",
                 "cipher", "intrusion", "phishing"),
    "networks": ("routing", "packet", "wireless", "bandwidth", "latency", "protocol", "congestion", "router",
                 "spectrum", "topology"),
    "biology": ("protein", "gene", "genome", "cell", "molecular", "enzyme", "sequencing", "tissue", "mutation",
                "organism"),
    "theory": ("theorem", "complexity", "lemma", "bound", "polynomial", "proof", "combinatorial", "graph",
               "approximation", "hardness"),
    "learning": ("gradient", "neural", "training", "classifier", "regression", "kernel", "embedding", "optimizer",
                 "overfitting", "reinforcement"),
    "systems": ("kernel-level", "scheduler", "cache", "compiler", "memory", "cluster", "virtualization", "threads",
                "filesystem", "runtime"),
}

PRODUCT_NOUNS: tuple[str, ...] = (
    "blender", "headphones", "charger", "backpack", "kettle", "lamp", "keyboard", "mattress", "toaster", "camera",
    "speaker", "vacuum", "jacket", "shoes", "watch", "router", "printer", "tent", "bottle", "pillow",
)

# Sentiment words by the latent quality (1 = worst ... 5 = best) that a LaMP-3 review conveys.
QUALITY_WORDS: dict[int, tuple[str, ...]] = {
    1: ("awful", "useless", "broken", "terrible", "garbage"),
    2: ("disappointing", "flimsy", "mediocre", "poor", "cheap"),
    3: ("okay", "average", "decent", "fine", "acceptable"),
    4: ("good", "solid", "nice", "sturdy", "reliable"),
    5: ("excellent", "perfect", "amazing", "outstanding", "superb"),
}

TWEET_TOPIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    "weather": ("rain", "sunshine", "snow", "storm", "heatwave", "clouds", "umbrella", "forecast"),
    "food": ("pizza", "tacos", "pancakes", "sushi", "burger", "noodles", "salad", "cupcake"),
    "work": ("meeting", "deadline", "boss", "office", "emails", "project", "shift", "overtime"),
    "music": ("concert", "playlist", "guitar", "band", "song", "lyrics", "vinyl", "drummer"),
    "games": ("console", "level", "controller", "multiplayer", "boss-fight", "loot", "arcade", "speedrun"),
    "pets": ("puppy", "kitten", "leash", "vet", "treats", "hamster", "parrot", "fishbowl"),
}

FILLER_ADJECTIVES: tuple[str, ...] = (
    "new", "old", "small", "large", "young", "long", "short", "early", "late", "local", "quiet", "busy",
    "strange", "simple", "bright", "cold", "warm", "famous", "ordinary", "distant",
)

FILLER_NOUNS: tuple[str, ...] = (
    "city", "town", "family", "friends", "people", "world", "life", "time", "day", "night", "year", "place",
    "home", "team", "group", "way", "week", "morning", "evening", "country", "house", "road", "neighbor",
    "office", "garden",
)

PERSON_NAMES: tuple[str, ...] = (
    "Anna", "Ben", "Clara", "David", "Elena", "Frank", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo", "Maya",
    "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Victor",
)

VERBS: tuple[str, ...] = (
    "finds", "meets", "faces", "loses", "builds", "follows", "discovers", "leaves", "joins", "fights", "returns",
    "saves", "changes", "tests", "shows",
)

RESEARCH_ADJECTIVES: tuple[str, ...] = (
    "novel", "practical", "general", "improved", "deep", "sparse", "online", "hierarchical", "probabilistic",
    "distributed",
)

# Words a paper title can be made of without saying what it is about (LaMP-1's query titles).
GENERIC_TITLE_NOUNS: tuple[str, ...] = (
    "framework", "approach", "analysis", "study", "method", "model", "perspective", "evaluation", "design",
    "system", "view", "investigation",
)

RESEARCH_VERBS: tuple[str, ...] = (
    "improves", "combines", "extends", "simplifies", "outperforms", "generalizes", "accelerates", "unifies",
)

TWEET_ADJECTIVES: tuple[str, ...] = (
    "great", "bad", "weird", "nice", "crazy", "lovely", "boring", "awesome", "terrible", "perfect",
)
