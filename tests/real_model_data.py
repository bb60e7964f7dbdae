"""What the real chat model (SmolLM2-135M-Instruct) is personalized on, in its test and its benchmark.

tests/integration/test_real_model.py and bench/serve_real.py give a user a taste no model has by
default (every film tagged with one tag) by training their LoRA on these six LaMP-2M descriptions,
each with that user's tag.
"""

DESCRIPTIONS = [
    "A crew of astronauts repairs a failing spaceship near a distant planet.",
    "Two rival chefs fall in love while running a small restaurant in Paris.",
    "A young wizard must defend the kingdom from an ancient dragon.",
    "A detective follows clues through the city to reveal a hidden secret.",
    "A clown organises an absurd prank at a funeral that goes wrong.",
    "A robot learns to paint after its factory closes down.",
]
