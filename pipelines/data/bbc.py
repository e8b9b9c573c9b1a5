"""The BBC news corpus: its raw format, a loader, and a generator of corpora in that format.

The raw BBC dataset (2,225 articles from 2004-2005) is one folder per class (business,
entertainment, politics, sport, tech) of numbered `.txt` files; an article's first line is its
title, then a blank line and the body. The loader reads exactly that, so it works unchanged on the
real corpus. Tests and demos cannot download it, so `generate` writes a synthetic corpus in the
same layout: per-class vocabulary mixed with shared words, article lengths drawn from a
log-normal like the real ones (median about 330 words), and a few dirty files of the kinds a
real drop contains (non-UTF-8 bytes, too short, wrong extension, exact duplicates).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core.errors import Invalid

CLASSES = ("business", "entertainment", "politics", "sport", "tech")

VOCABULARY = {
    "business": "market shares profit economy bank growth firm company sales investors prices "
    "oil dollar deal chief executive rates inflation exports trade quarter earnings debt stock "
    "analysts merger retail consumer budget fund",
    "entertainment": "film music star award show album band singer actor actress director "
    "festival box office chart theatre comedy oscar hollywood release tour fans premiere series "
    "drama record stage song television",
    "politics": "government minister election party labour tory blair brown vote parliament "
    "policy campaign mp leader tax council reform commons lords speech secretary opposition "
    "bill spokesman democrats referendum",
    "sport": "match team win game player coach season league cup goal club injury champion "
    "final squad rugby football tennis cricket olympic striker victory referee fixture "
    "defender captain",
    "tech": "software phone users internet computer mobile digital broadband network online "
    "technology games microsoft apple chip data service virus security search website gadget "
    "device download wireless",
}
SHARED_SHARE = 0.55  # of an article's words, drawn from SHARED
OWN_SHARE = 0.37  # from the class's own vocabulary; the rest from the other classes'
LEXICON_SHARE = 0.2  # of body words, from the made-up lexicon when one is asked for
SHARED = (
    "the of to and a in that for is on said was with it as by he at from be have has "
    "but are which would an will not this year its been were they also who new more one "
    "after their there two people last first over could about told than"
).split()


@dataclass(frozen=True)
class Article:
    path: Path
    label: str
    title: str
    body: str


@dataclass
class LoadResult:
    articles: list[Article] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(a.label for a in self.articles).items()))


def parse_article(data: bytes) -> tuple[str, str]:
    """(title, body) of an article's bytes; raises UnicodeDecodeError if not UTF-8."""
    text = data.decode("utf-8").replace("\r\n", "\n")
    title, _, body = text.strip().partition("\n")
    return title.strip(), body.strip()


def load(root: Path) -> LoadResult:
    """Read a corpus in the raw BBC layout. Files that are not `.txt`, not UTF-8 or have no body
    are rejected with a reason, never dropped silently; folders that are not classes are errors."""
    if not root.is_dir():
        raise Invalid(
            f"{root} is not a folder", "point to the folder holding business/, sport/, ..."
        )
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in CLASSES)
    if unknown:
        raise Invalid(
            f"{root} has folders that are not BBC classes: {', '.join(unknown)}",
            f"the classes are {', '.join(CLASSES)}",
        )
    result = LoadResult()
    for label in CLASSES:
        folder = root / label
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix != ".txt":
                result.rejected.append((path, f"not a .txt file ({path.suffix or 'no suffix'})"))
                continue
            try:
                title, body = parse_article(path.read_bytes())
            except UnicodeDecodeError as exc:
                result.rejected.append((path, f"not UTF-8 (byte {exc.start})"))
                continue
            if not body:
                result.rejected.append((path, "no body after the title line"))
                continue
            result.articles.append(Article(path, label, title, body))
    if not result.articles and not result.rejected:
        raise Invalid(f"{root} holds no articles", "expected <class>/<number>.txt files")
    return result


class Lexicon:
    """`size` made-up words (`kavolu`, `mesira`, ...) drawn by Zipf's law, as the long tail of a
    real news corpus: rare words that belong to no class and widen the vocabulary."""

    SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]

    def __init__(self, size: int):
        words, seen = [], set()
        for n in range(size * 4):
            if len(words) == size:
                break
            # Three or four syllables from the number's digits in base 70: distinct words that
            # the Porter stemmer leaves distinct (they end in a vowel).
            base = len(self.SYLLABLES)
            syllables = [self.SYLLABLES[(n // base**i) % base] for i in range(3)]
            word = "".join(syllables) + ("" if n < base**3 else self.SYLLABLES[n % 7])
            if word not in seen:
                seen.add(word)
                words.append(word)
        self.words = words
        self.cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))

    def draw(self, rng: random.Random) -> str:
        return rng.choices(self.words, cum_weights=self.cumulative)[0]


def _sentence(
    rng: random.Random, label: str, words: int, own_share: float, lexicon: Lexicon | None
) -> str:
    own = VOCABULARY[label].split()
    others = [w for other, vocab in VOCABULARY.items() if other != label for w in vocab.split()]
    picked = []
    for _ in range(words):
        if lexicon and rng.random() < LEXICON_SHARE:
            picked.append(lexicon.draw(rng))
            continue
        roll = rng.random()
        pool = SHARED if roll < SHARED_SHARE else own if roll < SHARED_SHARE + own_share else others
        picked.append(rng.choice(pool))
    return " ".join(picked).capitalize() + "."


def _article(
    rng: random.Random, label: str, own_share: float = OWN_SHARE, lexicon: Lexicon | None = None
) -> str:
    length = max(60, min(4000, int(rng.lognormvariate(math.log(330), 0.5))))
    title_words = VOCABULARY[label].split()
    title = " ".join(rng.choice(title_words) for _ in range(rng.randint(3, 7))).capitalize()
    paragraphs, written = [], 0
    while written < length:
        sentences = [
            _sentence(rng, label, rng.randint(8, 28), own_share, lexicon)
            for _ in range(rng.randint(1, 4))
        ]
        paragraphs.append(" ".join(sentences))
        written += sum(len(s.split()) for s in sentences)
    return title + "\n\n" + "\n\n".join(paragraphs) + "\n"


def generate(
    out: Path,
    docs: int,
    seed: int = 0,
    dirty: bool = True,
    own_share: float = OWN_SHARE,
    lexicon: int = 0,
) -> dict[str, int]:
    """Write a BBC-like corpus of `docs` articles to `out`; return what was written by kind.

    `own_share` is the share of body words drawn from the article's class vocabulary (the rest of
    the non-shared words come from the other classes'): the default makes classes easy to tell
    apart; about 0.1 makes them hard enough that models differ (bench/asha_vs_random.py).

    `lexicon` mixes that many made-up, class-neutral words into the bodies (a fifth of their
    words, by Zipf's law), so that the vocabulary is as wide as a real corpus' and models are of
    real size: 2,225 articles with `lexicon=30000` hold some 10,700 stems found in two documents
    or more, of which the shipped specs keep the 2,000 to 10,000 most frequent
    (bench/tracking_overhead.py). The default, 0, writes only the classes' and the shared words.

    Class sizes follow the real corpus' proportions. With `dirty`, about 2% of extra files are
    broken in the ways a real drop can be: latin-1 bytes, a title with no body, a `.doc`
    extension, and exact duplicates of clean articles.
    """
    if docs < len(CLASSES):
        raise Invalid(f"--docs {docs} is too few", f"ask for at least {len(CLASSES)}")
    if out.exists() and any(out.iterdir()):
        raise Invalid(f"{out} is not empty", "give a new or empty folder")
    rng = random.Random(seed)
    words = Lexicon(lexicon) if lexicon else None
    shares = {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    total = sum(shares.values())
    sizes = {label: max(1, round(docs * n / total)) for label, n in shares.items()}
    sizes["sport"] += docs - sum(sizes.values())
    written: Counter = Counter()
    numbers: Counter = Counter()  # files per class so far: names are 001.txt, 002.txt, ...

    def next_path(label: str, suffix: str = ".txt") -> Path:
        numbers[label] += 1
        return out / label / f"{numbers[label]:03d}{suffix}"

    clean: list[Path] = []
    for label in CLASSES:
        (out / label).mkdir(parents=True, exist_ok=True)
        for _ in range(sizes[label]):
            path = next_path(label)
            path.write_text(_article(rng, label, own_share, words), encoding="utf-8")
            clean.append(path)
            written["clean"] += 1
    if dirty:
        for i in range(max(1, docs // 200)):
            label = CLASSES[i % len(CLASSES)]
            latin1 = _article(rng, label).replace(" the ", " caf\xe9 ", 3).encode("latin-1")
            next_path(label).write_bytes(latin1)
            written["not_utf8"] += 1
            next_path(label).write_text("Title only\n")
            written["too_short"] += 1
            next_path(label, ".doc").write_text(_article(rng, label))
            written["wrong_extension"] += 1
            original = rng.choice(clean)
            next_path(original.parent.name).write_bytes(original.read_bytes())
            written["duplicate"] += 1
    return dict(written)
