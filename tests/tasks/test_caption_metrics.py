"""Caption metrics pinned to the COCO caption evaluation.

The expected numbers were produced by running ``pycocoevalcap`` 1.2 (PyPI wheel, in a throw-away venv; not a zoo
dependency): ``Bleu(4).compute_score(gts, res)[0][3]`` and ``Cider().compute_score(gts, res)[0]`` on the captions below
after ``zoo.tasks.caption_metrics.tokenize`` joined by spaces (its PTB tokenizer needs Java; the captions are plain
words so tokenization is not what is compared). The captions were written for this test.
"""

import pytest

from zoo.tasks.caption_metrics import bleu4, cider_d, tokenize

CASES = {
 "mixed": [
  [
   "a dog runs through the grass",
   "two children play on the beach",
   "a man rides a red bike down the street",
   "a black cat sleeps"
  ],
  [
   [
    "a brown dog is running through the green grass",
    "a dog runs across a field",
    "the dog runs on the grass outside"
   ],
   [
    "two kids are playing in the sand at the beach",
    "children play near the water",
    "two young children play on a sandy beach",
    "a boy and a girl at the beach"
   ],
   [
    "a man on a bicycle rides down the street",
    "a cyclist in red rides through town",
    "a person riding a red bike on the road"
   ],
   [
    "a cat is sleeping on a couch",
    "a black cat naps on the sofa",
    "the cat sleeps in the sun",
    "a black and white cat lies down",
    "a sleepy cat"
   ]
  ]
 ],
 "short": [
  [
   "dog",
   "a child"
  ],
  [
   [
    "a small dog plays with a ball in the yard",
    "the dog is playing"
   ],
   [
    "a child is climbing a rock wall",
    "a young child climbs"
   ]
  ]
 ],
 "exact": [
  [
   "a dog is playing with a ball",
   "a woman walks her dog in the park"
  ],
  [
   [
    "a dog is playing with a ball",
    "a puppy chases a toy"
   ],
   [
    "a woman walks her dog in the park",
    "a lady and her dog walk outside",
    "someone walking a dog"
   ]
  ]
 ],
 "none": [
  [
   "purple elephants fly",
   "quantum soup"
  ],
  [
   [
    "a man sits on a bench",
    "an old man resting"
   ],
   [
    "a girl jumps into a pool",
    "a child swims"
   ]
  ]
 ]
}

COCO = {
 "mixed": {
  "bleu4": 6.3403381929338e-05,
  "cider": 2.033507593032323
 },
 "short": {
  "bleu4": 0.00018887560271164494,
  "cider": 1.13265865575284
 },
 "exact": {
  "bleu4": 0.999999999846931,
  "cider": 4.305096259697625
 },
 "none": {
  "bleu4": 6.057025363043208e-14,
  "cider": 0.0
 }
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_pycocoevalcap(name):
    candidates, references = CASES[name]
    assert bleu4(candidates, references) == pytest.approx(COCO[name]["bleu4"], rel=1e-9, abs=1e-15)
    assert cider_d(candidates, references) == pytest.approx(COCO[name]["cider"], rel=1e-9, abs=1e-12)


def test_tokenize_and_bad_input():
    assert tokenize("A dog, running!  It's 2 o'clock.") == ["a", "dog", "running", "it's", "2", "o'clock"]
    with pytest.raises(ValueError, match="2 candidate captions for 1 reference lists"):
        bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] have no reference caption"):
        cider_d(["a", "b"], [["a"], []])
