"""The synthetic corpus's closed vocabulary: keyword lists per label or topic, and filler.

Every text the generator writes is built from these lists (plus the task's label names), so a
tokenizer trained on the corpus covers it and a tiny model can learn which words are evidence for
which label. Keyword lists are disjoint across labels within a task: a word is evidence for one
label only.
"""

from __future__ import annotations

MOVIE_TAG_KEYWORDS: dict[str, tuple[str, ...]] = {
    "sci-fi": ("spaceship", "alien", "robot", "planet", "galaxy", "laser", "android", "starship", "cyborg", "orbit"),
    "based on a book": ("novel", "author", "chapter", "adaptation", "bestseller", "manuscript", "library", "poet",
                        "memoir", "publisher"),
    "comedy": ("jokes", "hilarious", "prank", "clown", "sitcom", "goofy", "laughter", "wacky", "silly", "banter"),
    "action": ("explosion", "chase", "fistfight", "commando", "helicopter", "gunfire", "stunt", "bomb", "rescue",
               "mercenary"),
    "twist ending": ("reveal", "secret", "mystery", "unexpected", "clue", "deception", "surprise", "hidden",
                     "riddle", "illusion"),
    "dystopia": ("regime", "rebellion", "surveillance", "wasteland", "curfew", "propaganda", "ruins", "uprising",
                 "ration", "tyrant"),
    "dark comedy": ("absurd", "morbid", "funeral", "gallows", "cynical", "grim", "satire", "deadpan", "macabre",
                    "awkward"),
    "classic": ("timeless", "vintage", "legendary", "golden", "masterpiece", "elegant", "monochrome", "oldtime",
                "revered", "iconic"),
    "psychology": ("obsession", "therapist", "paranoia", "trauma", "memory", "identity", "madness", "anxiety",
                   "dream", "mind"),
    "fantasy": ("wizard", "dragon", "kingdom", "sorcery", "elf", "castle", "spell", "quest", "enchanted", "prophecy"),
    "romance": ("lovers", "kiss", "wedding", "sweetheart", "passion", "courtship", "heartbreak", "date", "flirt",
                "soulmate"),
    "thought-provoking": ("philosophy", "meaning", "question", "moral", "dilemma", "reflection", "ethics",
                          "existence", "conscience", "insight"),
    "social commentary": ("inequality", "poverty", "class", "racism", "injustice", "protest", "workers", "community",
                          "prejudice", "reform"),
    "violence": ("brutal", "bloody", "massacre", "revenge", "gang", "murder", "savage", "killer", "torture",
                 "carnage"),
    "true story": ("biography", "historical", "real", "documented", "veteran", "survivor", "archive", "witness",
                   "testimony", "chronicle"),
}

NEWS_CATEGORY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "food & drink": ("recipe", "chef", "restaurant", "wine", "baking", "dessert", "kitchen", "coffee", "menu",
                     "flavor"),
    "sports": ("league", "coach", "playoff", "stadium", "athlete", "championship", "tournament", "goalkeeper",
               "season", "referee"),
    "education": ("school", "teacher", "classroom", "students", "curriculum", "exam", "principal", "tuition",
                  "homework", "campus"),
    "parents": ("toddler", "parenting", "baby", "daycare", "mom", "dad", "kids", "bedtime", "diaper", "nursery"),
    "religion": ("church", "faith", "prayer", "pastor", "temple", "scripture", "worship", "pope", "mosque",
                 "spiritual"),
    "travel": ("airline", "passport", "vacation", "hotel", "beach", "tourist", "itinerary", "cruise", "luggage",
               "destination"),
    "business": ("startup", "investor", "revenue", "merger", "shareholder", "profits", "market", "executive",
                 "retail", "earnings"),
    "crime": ("police", "arrest", "suspect", "robbery", "detective", "prison", "trial", "burglary", "fraud",
              "sheriff"),
    "science & technology": ("smartphone", "software", "laboratory", "physicist", "satellite", "algorithm",
                             "gadget", "researchers", "telescope", "chip"),
    "culture & arts": ("museum", "painter", "gallery", "sculpture", "theater", "orchestra", "poetry", "exhibit",
                       "ballet", "opera"),
    "entertainment": ("celebrity", "actress", "singer", "premiere", "album", "reality", "awards", "paparazzi",
                      "streaming", "hollywood"),
    "politics": ("senator", "election", "congress", "campaign", "voters", "president", "ballot", "legislation",
                 "governor", "debate"),
    "women": ("feminist", "sisterhood", "equality", "empowerment", "maternity", "harassment", "suffrage",
              "womanhood", "gender", "heroine"),
    "style & beauty": ("fashion", "makeup", "runway", "hairstyle", "lipstick", "designer", "wardrobe", "skincare",
                       "outfit", "jewelry"),
    "healthy living": ("workout", "nutrition", "yoga", "sleep", "wellness", "meditation", "vitamins", "jogging",
                       "calories", "stress"),
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
    1: ("awful", "useless", "broken", "terrible", "garbage", "worthless", "defective", "horrible"),
    2: ("disappointing", "flimsy", "mediocre", "poor", "cheap", "unreliable", "weak", "lacking"),
    3: ("okay", "average", "decent", "fine", "acceptable", "ordinary", "passable", "adequate"),
    4: ("good", "solid", "nice", "sturdy", "reliable", "pleasant", "handy", "useful"),
    5: ("excellent", "perfect", "amazing", "outstanding", "superb", "flawless", "fantastic", "brilliant"),
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
