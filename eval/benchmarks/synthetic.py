"""Generated text for the benchmarks kvjax builds itself (RULER-style tasks, MultiNeedle with a generated haystack):
a deterministic prose stream, a plain "noise" haystack, word lists, placement of inserts at a depth, and fitting a
prompt to a target length in tokens.

Everything here is written for kvjax; no third-party text. Prose sentences contain no digits, no hyphens and no
capitalised names beyond a sentence's first word, so numeric needles, hyphenated keys and invented proper names
inserted into them are unambiguous.
"""
from __future__ import annotations

import bisect
import random
from typing import Callable, Sequence

from .base import CountTokens

# ----------------------------------------------------------------------------------------------------- word lists
#: Concrete nouns (singular), lower case, no digits or hyphens.
NOUNS = (
    "apple", "anchor", "basket", "beacon", "blanket", "bottle", "bridge", "bucket", "cabin", "candle", "canyon",
    "carpet", "castle", "cellar", "chimney", "clock", "cloud", "compass", "cottage", "crystal", "curtain", "desert",
    "diamond", "dolphin", "drum", "eagle", "engine", "feather", "fence", "ferry", "forest", "fountain", "garden",
    "glacier", "globe", "harbor", "helmet", "hammer", "island", "jacket", "kettle", "ladder", "lantern", "lemon",
    "library", "lighthouse", "magnet", "marble", "meadow", "mirror", "mountain", "needle", "orchard", "paddle",
    "palace", "parrot", "pebble", "pepper", "piano", "pillow", "planet", "pocket", "pond", "quilt", "rabbit",
    "river", "rocket", "saddle", "satchel", "shovel", "silver", "spoon", "stable", "statue", "tablet", "teapot",
    "thunder", "tiger", "tower", "trumpet", "tunnel", "turtle", "umbrella", "valley", "velvet", "violin",
    "wagon", "walnut", "whistle", "window", "wizard", "yacht", "zebra", "acorn", "badger", "barrel", "biscuit",
    "button", "camel", "canoe", "cherry", "cobble", "comet", "cricket", "dragon", "falcon", "ginger", "goblet",
    "granite", "hazel", "honey", "iceberg", "jungle", "kitten", "lagoon", "lizard", "locket", "mango", "meteor",
    "mitten", "nectar", "oyster", "pirate", "puzzle", "raven", "ribbon", "salmon", "scarf", "sparrow", "tulip",
    "vessel", "walrus", "willow",
)
#: Adjectives, lower case.
ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "brisk", "calm", "clever", "crimson", "curious",
    "dusty", "eager", "early", "faded", "fancy", "fierce", "fragile", "frosty", "gentle", "giant", "golden",
    "grand", "hidden", "hollow", "humble", "icy", "jolly", "keen", "lively", "lonely", "lucky", "misty",
    "modest", "narrow", "noble", "odd", "pale", "patient", "polite", "proud", "quick", "quiet", "rapid", "rare",
    "restless", "royal", "rusty", "secret", "shiny", "silent", "sleepy", "smooth", "solemn", "spare", "steady",
    "stormy", "sturdy", "sudden", "swift", "tender", "tidy", "tiny", "velvet", "vivid", "wandering", "wary",
    "wild", "windy", "wise", "wooden", "young", "zealous",
)
_PLACES = ("the old market", "the northern valley", "the harbor town", "the hill village", "the quiet square",
           "the river bank", "the mountain pass", "the city gate", "the forest road", "the coastal path",
           "the eastern fields", "the stone bridge", "the village school", "the public garden", "the train station")
_ROLES = ("The baker", "A traveller", "The ferryman", "An old farmer", "The librarian", "A young painter",
          "The shepherd", "A visiting teacher", "The innkeeper", "The night guard", "A street musician",
          "The gardener", "A retired sailor", "The clockmaker", "A curious child")
_VERBS = (("rest", "rested"), ("wait", "waited"), ("fade", "faded"), ("drift", "drifted"), ("appear", "appeared"),
          ("vanish", "vanished"), ("settle", "settled"), ("tremble", "trembled"), ("glow", "glowed"),
          ("wander", "wandered"), ("linger", "lingered"), ("return", "returned"), ("change", "changed"),
          ("bloom", "bloomed"), ("sway", "swayed"))  # intransitive (base, past = past participle)
_VERBS_BASE = ("carry", "mend", "paint", "polish", "borrow", "collect", "follow", "guard", "measure", "sketch",
               "visit", "arrange", "describe", "remember", "examine")
_ADVERBS = ("slowly", "quietly", "briefly", "gently", "suddenly", "patiently", "happily", "softly", "warmly",
            "carefully", "rarely", "calmly")
_TIMES = ("before dawn", "after the storm", "during the festival", "at the end of summer", "in the early evening",
          "on a cold morning", "when the bells rang", "long after midnight", "before the harvest", "after supper")
_SEASONS = ("spring", "summer", "autumn", "winter")

NOISE_SENTENCES = ("The river is wide.", "The hills are quiet.", "The road goes on.", "The wind is cool.",
                   "Morning comes again.")
"""RULER's "noise" haystack idea (a short repeated passage of plain statements), in our own words."""


_FORMS = ("the {a} {n} near {place} {past} {adv}.",
          "{role} said that the {n} had {past} {time}.",
          "in the {season}, people from {place} like to {act} the {a} {n}.",
          "nobody expected the {n} to {verb} so {adv} {time}.",
          "{role} wanted to {act} a {a} {n} and a {a2} {n2}.",
          "there was a {a} {n} beside the {n2}, and it {past} {adv}.",
          "{time}, the {n} and the {n2} {past} together near {place}.",
          "some say the {a} {n} of {place} is older than the {n2}.",
          "{role} would {adv} {act} the {n} {time}.",
          "it is said that a {a} {n} once {past} by the {n2} {time}.")


def _sentence(rng: random.Random) -> str:
    c = rng.choice
    verb, past = c(_VERBS)
    s = c(_FORMS).format(n=c(NOUNS), n2=c(NOUNS), a=c(ADJECTIVES), a2=c(ADJECTIVES), verb=verb, past=past,
                         act=c(_VERBS_BASE), adv=c(_ADVERBS), time=c(_TIMES), season=c(_SEASONS),
                         place=c(_PLACES), role=c(_ROLES).lower())
    return s[0].upper() + s[1:]


class Prose:
    """A deterministic stream of generated English sentences: ``Prose(seed).sentences(n)`` is a prefix of
    ``Prose(seed).sentences(m)`` for n <= m, so a longer haystack only appends."""

    def __init__(self, seed: int | str):
        self._rng = random.Random(f"kvjax-prose:{seed}")
        self._out: list[str] = []
        self._words: list[int] = [0]  # cumulative word counts of the sentences

    def sentences(self, n: int) -> list[str]:
        while len(self._out) < n:
            self._out.append(_sentence(self._rng))
            self._words.append(self._words[-1] + len(self._out[-1].split()))
        return self._out[:n]

    def words(self, n: int) -> list[str]:
        """The first `n` words of the stream as sentence units (the last one cut after its n-th word, as RULER
        cuts its essay haystack to a word count): a length step of one word, so any target length is met."""
        while self._words[-1] < n:
            self.sentences(len(self._out) + 64)
        k = bisect.bisect_left(self._words, n)  # sentences[:k] hold >= n words
        units = self._out[:k]
        extra = self._words[k] - n
        if extra:
            units = units[:-1] + [" ".join(units[-1].split()[:-extra])]
        return units


def noise(n: int) -> list[str]:
    """n sentences of the plain noise haystack (NOISE_SENTENCES repeated)."""
    return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]


def word_keys(rng: random.Random, n: int, exclude: Sequence[str] = ()) -> list[str]:
    """n distinct "adjective-noun" keys (e.g. "quiet-harbor"), none of them in `exclude`."""
    if n > len(ADJECTIVES) * len(NOUNS) - len(exclude):
        raise ValueError(f"n={n} keys requested; at most {len(ADJECTIVES) * len(NOUNS)} exist")
    out, seen = [], set(exclude)
    while len(out) < n:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


_CONS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"


def pseudo_words(rng: random.Random, n: int, exclude: Sequence[str] = (), syllables: tuple[int, int] = (2, 3)
                 ) -> list[str]:
    """n distinct pronounceable invented words (consonant-vowel syllables, e.g. "tovaki"), none in `exclude`."""
    out, seen = [], set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(rng.randint(*syllables)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


# ----------------------------------------------------------------------------------------------------- placement
def insert_at_depths(units: Sequence[str], inserts: Sequence[str], depths: Sequence[float], sep: str = " "
                     ) -> tuple[list[str], list[int]]:
    """Insert `inserts[i]` between the units at the boundary nearest to `depths[i]` percent of the joined text
    (0 = before everything, 100 = after everything), keeping the given order at a shared boundary.

    Returns (new unit list, index of each insert in it).
    """
    if len(inserts) != len(depths):
        raise ValueError(f"{len(inserts)} inserts but {len(depths)} depths; they must match")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depth {d!r}; allowed: numbers in [0, 100] (percent of the haystack)")
    offsets = [0]  # character offset of each boundary (before unit j)
    for u in units:
        offsets.append(offsets[-1] + len(u) + len(sep))
    total = max(offsets[-1] - len(sep), 0)
    at = []
    for d in depths:
        want = total * d / 100
        j = bisect.bisect_left(offsets, want)
        if j > 0 and (j == len(offsets) or want - offsets[j - 1] <= offsets[j] - want):
            j -= 1
        at.append(min(j, len(units)))
    order = sorted(range(len(inserts)), key=lambda i: (at[i], i))
    out, where, shift = list(units), [0] * len(inserts), 0
    for i in order:
        out.insert(at[i] + shift, inserts[i])
        where[i] = at[i] + shift
        shift += 1
    return out, where


# ----------------------------------------------------------------------------------------------------- lengths
def fit_length(render: Callable[[int], str], count_tokens: CountTokens, target_tokens: int, *,
               tolerance: float = 0.02, start: int = 16, what: str = "prompt") -> tuple[int, str, int]:
    """The largest n with count_tokens(render(n)) <= target_tokens (exponential then binary search; `render` must
    grow with n), and that text and its count. Raises ValueError when even n=1 is too long or the best fit is more
    than `tolerance` below the target."""
    if not isinstance(target_tokens, int) or target_tokens < 1:
        raise ValueError(f"target_tokens={target_tokens!r}, allowed: int >= 1 tokens")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r}, allowed: (0, 1) as a fraction of target_tokens")
    cache: dict[int, tuple[str, int]] = {}

    def size(n: int) -> int:
        if n not in cache:
            text = render(n)
            cache[n] = (text, int(count_tokens(text)))
        return cache[n][1]

    if size(1) > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} is too small: the {what} without filler already has "
                         f"{size(1)} tokens")
    lo, hi = 1, max(2, start)
    if size(hi) <= target_tokens:  # jump near the answer from the tokens per unit of one probe
        lo, hi = hi, max(hi + 1, int(hi * target_tokens / max(size(hi), 1) * 1.05) + 1)
    while size(hi) <= target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= target_tokens:
            lo = mid
        else:
            hi = mid
    text, n_tok = cache[lo]
    if n_tok < target_tokens * (1 - tolerance):
        raise ValueError(f"target_tokens={target_tokens}: the closest {what} has {n_tok} tokens, more than "
                         f"{tolerance:.0%} short (one unit of filler is too coarse at this length)")
    return lo, text, n_tok
