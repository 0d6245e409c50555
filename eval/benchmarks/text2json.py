"""Text2JSON (shared/specs/benchmarks.md §2): the loader of the authors' format and a synthetic look-alike (§2.7).

Real format: JSON Lines, each record {"problem": str, "answer": str}; `problem` is the entire user message
(instructions + source text), `answer` a JSON-encoded list of objects with exactly the keys "name" + two string
attributes. The authors' prompt is the single HUMAN turn "{problem}", so `user_text == problem`; `max_out_len=1024`.
The real file is not public: `generate_text2json` builds samples with the same structure in four domains (products,
medical professionals, organisations, movies), the output format being either the paper's JSON array or our line
format "name | attr1 | attr2" (scored by the same matching rules, see eval.metrics.text2json_lines_iou).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
import random
from typing import Any, Iterable, Mapping, Sequence

from eval import metrics

from eval.data import locate

from .base import CountTokens, FileCheck, MalformedLog, Sample, register

MAX_NEW_TOKENS = 1024  # the authors' max_out_len for Text2JSON
FORMATS = ("json", "lines")

# =================================================================================================================
# Loader of the real format
# =================================================================================================================


def validate_text2json_record(rec: Any) -> str | None:
    """Why a record is malformed (a message), or None if it is usable by the authors' prompt and scorer.

    Rejected: not an object; `problem` not a non-empty string; `answer` not a string holding a non-empty JSON list
    of objects with exactly 3 string-valued keys including "name"; duplicate names after the U+2019 -> '
    normalisation (the authors' scorer excludes such "bad samples" from the average, so skipping them up front
    gives the same average without running the model on them).
    """
    if not isinstance(rec, Mapping):
        return f"record is {type(rec).__name__}, expected an object"
    problem, answer = rec.get("problem"), rec.get("answer")
    if not isinstance(problem, str) or not problem.strip():
        return "field 'problem' missing or not a non-empty string"
    if not isinstance(answer, str):
        return f"field 'answer' missing or not a JSON-encoded string (got {type(answer).__name__})"
    try:
        gold = metrics.parse_text2json_gold(answer)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return f"field 'answer' malformed: {e}"
    if gold is None:
        return "field 'answer' repeats a name (the authors' scorer drops such samples)"
    return None


def _read_jsonl(path: pathlib.Path, log: MalformedLog, n_samples: int | None) -> list[tuple[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if n_samples is not None and lineno > n_samples:
                break
            if not line.strip():
                log.skip(f"line {lineno}", "empty line")
                continue
            try:
                out.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                log.skip(f"line {lineno}", f"invalid JSON ({e.msg} at column {e.colno})")
    return out


def load_text2json(path: str | pathlib.Path | None = None, *, hub_name: str | None = None, split: str = "train",
                   revision: str | None = None, data_dir: str | pathlib.Path | None = None,
                   n_samples: int | None = None) -> tuple[list[Sample], list[str]]:
    """Read Text2JSON records in the authors' format.

    Args:
      path: a local file or folder. `.jsonl`/`.json`/`.jsonl.gz` files are read line by line (so one bad line is
        skipped and counted instead of aborting the file, which the `datasets` JSON builder would do); other files
        (`.parquet`, `.csv`, `.arrow`) go through `datasets.load_dataset`; a folder written by
        `Dataset.save_to_disk` through `datasets.load_from_disk`. Default: `<data_dir>/text2json.jsonl`.
      hub_name: a Hugging Face hub dataset name, loaded with `datasets.load_dataset(hub_name, split=split,
        revision=revision)`; takes precedence over `path`.
      data_dir: the data root holding text2json.jsonl, used when neither is given; None = found by
        `eval.data.locate` ($KVJAX_DATA, kvjax's cache; the file is not on the hub).
      n_samples: keep only the first N records (lines), like the authors' TEXT2JSON_N_SAMPLES; None = all.
    Returns:
      (samples, malformed-record messages). Sample ids are "text2json-<index>" (0-based record index); extra
      fields of a record (e.g. "domain") are kept in `meta`.
    """
    if n_samples is not None and n_samples < 0:
        n_samples = None
    if hub_name is not None:
        import datasets

        log = MalformedLog(f"hub dataset {hub_name!r}")
        ds = datasets.load_dataset(hub_name, split=split, revision=revision)
        records = [(f"row {i}", r) for i, r in enumerate(ds) if n_samples is None or i < n_samples]
    else:
        if path is None:
            path = locate("text2json", data_dir).path
        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Text2JSON data not found at {str(path)!r} (the authors' file is not public; "
                                    f"generate a synthetic set with generate_text2json / write_text2json_jsonl)")
        log = MalformedLog(str(path))
        name = path.name.lower()
        if path.is_file() and name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            records = _read_jsonl(path, log, n_samples)
        else:
            import datasets

            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            else:
                builder = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(path.suffix.lower())
                if builder is None:
                    raise ValueError(f"path={str(path)!r}: unsupported file type; allowed: .jsonl, .json, "
                                     f".jsonl.gz, .parquet, .csv, .arrow or a save_to_disk folder")
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
            records = [(f"row {i}", r) for i, r in enumerate(ds) if n_samples is None or i < n_samples]

    samples = []
    for idx, (where, rec) in enumerate(records):
        why = validate_text2json_record(rec)
        if why is not None:
            log.skip(where, why)
            continue
        meta = {k: v for k, v in rec.items() if k not in ("problem", "answer")}
        meta.setdefault("format", "json")
        samples.append(Sample(id=f"text2json-{idx}", benchmark="text2json", user_text=rec["problem"],
                              gold=rec["answer"], meta=meta, max_new_tokens=MAX_NEW_TOKENS))
    log.warn()
    return samples, log.messages


def check_files(path: str | pathlib.Path) -> list[FileCheck]:
    """`kvjax data check` for a Text2JSON file: records usable by the authors' prompt and scorer, and one message
    per malformed line."""
    samples, malformed = load_text2json(path)
    return [FileCheck(str(path), len(samples), malformed)]


def write_text2json_jsonl(samples: Iterable[Sample], path: str | pathlib.Path) -> pathlib.Path:
    """Write samples in the authors' format, one {"problem", "answer", "domain", "format"} object per line."""
    path = pathlib.Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            rec = {"problem": s.user_text, "answer": s.gold}
            for k in ("domain", "format"):
                if k in s.meta:
                    rec[k] = s.meta[k]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


# =================================================================================================================
# Synthetic generator (§2.7)
# =================================================================================================================

R = "\u2019"  # typographic apostrophe, used in some names to exercise the scorer's normalisation


@dataclasses.dataclass(frozen=True)
class Domain:
    """One task type: the entity noun, the two attribute keys and how the instruction describes them."""

    name: str
    entity: str
    plural: str
    name_desc: str
    keys: tuple[str, str]
    key_desc: tuple[str, str]


DOMAINS: dict[str, Domain] = {
    "products": Domain("products", "product", "products", "the product name", ("brand", "price"),
                       ("the brand that makes it", "its price exactly as written, with the currency symbol")),
    "medical": Domain("medical", "medical professional", "medical professionals",
                      "the full name including the title Dr.", ("specialty", "hospital"),
                      ("the medical specialty", "the hospital where they practise")),
    "organisations": Domain("organisations", "organisation", "organisations", "the organisation name",
                            ("founded", "headquarters"),
                            ("the year it was founded", "the city of its headquarters")),
    "movies": Domain("movies", "movie", "movies", "the movie title", ("year", "director"),
                     ("the release year", "the director")),
}

_FIRST = ("Ana", "Marcus", "Priya", "Tomasz", "Helen", "Kwame", "Sofia", "Liam", "Yuki", "Daniel", "Farah",
          "Mateo", "Ingrid", "Oluwaseun", "Chloe", "Rafael", "Mei", "Viktor", "Leah", "Arjun", "Noor", "Elias",
          "Camille", "Jonah", "Aylin", "Gabriel", "Zara", "Henrik", "Lucia", "Samuel", "Keiko", "Nadia", "Omar",
          "Beatrix", "Tariq", "Freya", "Dmitri", "Isla", "Rohan", "Greta")
_LAST = ("Ruiz", "Okafor", "Lindqvist", "Nakamura", "Bennett", f"O{R}Connell", "Kowalski", "Haddad", "Moreau",
         f"D{R}Amico", "Castellanos", "Adeyemi", "Fischer", "Varga", "Thornton", "Iqbal", "Sorensen", "Petrov",
         "Mbeki", "Lachance", "Whitfield", "Brennan", "Takahashi", "Esposito", "Novak", "Achebe", "Carvalho",
         "Lindgren", f"O{R}Hara", "Duarte", "Kaur", "Halvorsen", "Quintero", "Abernathy", "Rasmussen", "Yilmaz")
_CITIES = ("Rotterdam", "Porto Alegre", "Tucson", "Gdansk", "Nairobi", "Osaka", "Valencia", "Winnipeg", "Leeds",
           "Brisbane", "Tallinn", "Monterrey", "Lyon", "Bergen", "Chennai", "Halifax", "Graz", "Cork", "Boise",
           "Dunedin", "Bilbao", "Turku", "Pune", "Accra", "Ghent", "Savannah", "Kraków", "Adelaide", "Malmö",
           "Quito", "Nantes", "Spokane")

# products
_SERIES = ("Nimbus", "Aurora", "Vertex", "Zephyr", "Halcyon", "Quasar", "Solstice", "Tundra", "Cascade", "Ember",
           "Orbit", "Summit", "Pioneer", "Lumen", "Kestrel", "Meridian", f"Chef{R}s Choice", f"Traveler{R}s",
           "Polaris", "Sequoia", "Cobalt", "Monarch", "Tempest", "Verdant")
_PTYPES = ("Espresso Maker", "Wireless Headphones", "Air Purifier", "Standing Desk", "Robot Vacuum", "Smartwatch",
           "Electric Kettle", "Gaming Monitor", "Trail Backpack", "Camera Drone", "Stand Mixer", "E-Reader",
           "Bluetooth Speaker", "Road Bike Helmet", "Office Chair", "Rice Cooker", "Portable Projector",
           "Mechanical Keyboard", "Dehumidifier", "Action Camera")
_BRANDS = ("Veltrona", "Brightwell", "Korrin & Sons", f"O{R}Hara Home", "Maple Ridge", "Sundquist", "Arcturus Labs",
           "Hollis", "Norvane", "Pellucid", "Tarrant Works", "Quillon", "Everlake", "Redfern", "Zanetti",
           "Calloway & Pike", "Lindenhaus", "Oakhurst")
_COLORS = ("matte black", "pearl white", "forest green", "slate grey", "navy blue", "copper", "sand beige")

# medical
_SPECIALTIES = ("Cardiology", "Dermatology", "Pediatric Oncology", "Neurology", "Orthopedic Surgery",
                "Endocrinology", "Gastroenterology", "Rheumatology", "Ophthalmology", "Nephrology",
                "Infectious Diseases", "Geriatric Medicine", "Pulmonology", "Sports Medicine", "Psychiatry")
_HOSP_PLACE = ("Riverside", "Lakeview", f"St. Brigid{R}s", "Northgate", "Mercy", "Cedar Hills", "Harborview",
               "Kingsbridge", "Pine Valley", "Ashford", f"Children{R}s", "Westbrook", "Summit Ridge", "Elmwood")
_HOSP_KIND = ("General Hospital", "Medical Center", "University Hospital", "Regional Hospital", "Clinic",
              "Memorial Hospital")
_SCHOOLS = ("Halden University", "the Royal Meridian College", "Eastvale School of Medicine", "Corwin University",
            "the Institute of Clinical Sciences")
_LANGS = ("Spanish", "French", "Arabic", "Hindi", "Portuguese", "Japanese", "Polish", "Swahili", "German")

# organisations
_ORG_A = ("Bluewater", "Harrow & Finch", "Northgate", "Silverline", "Greystone", "Brightpath", "Ironbark", "Clearview",
          "Redwood", "Fairhaven", "Stonebridge", "Windrose", f"Hawker{R}s", "Larkspur", "Copperfield", "Tidewell",
          "Amberly", "Westmarch", "Hollowell", "Riverbend")
_ORG_B = ("Analytics", "Logistics", "Foods", "Energy", "Biotech", "Textiles", "Robotics", "Shipping", "Media",
          "Software", "Insurance", "Ceramics", "Aerospace", "Pharmaceuticals", "Outfitters")
_ORG_C = ("Group", "Ltd.", "Inc.", "Cooperative", "Holdings", "Partners", "Foundation", "Company", "AG", "Collective")
_SECTORS = ("renewable energy", "consumer goods", "freight", "medical devices", "financial services", "agriculture",
            "education technology", "construction")

# movies
_M_ADJ = ("Silent", "Crimson", "Forgotten", "Hollow", "Endless", "Broken", "Golden", "Midnight", "Distant",
          "Burning", "Quiet", "Last", "Frozen", "Wandering", "Hidden", "Restless")
_M_NOUN = ("River", "Harbor", "Orchard", "Frontier", "Lantern", "Garden", "Signal", "Horizon", "Empire", "Tide",
           "Mirror", "Meadow", "Station", "Voyage", "Kingdom", "Letter")
_M_OWNER = (f"Gambler{R}s", f"Widow{R}s", f"Captain{R}s", f"Stranger{R}s", f"Painter{R}s", f"Keeper{R}s")
_GENRES = ("drama", "thriller", "comedy", "science-fiction film", "western", "musical", "war film", "mystery")


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _price(rng: random.Random) -> str:
    whole = rng.choice((rng.randint(19, 399), rng.randint(400, 2999)))
    cents = rng.choice(("99", "49", "00", "95", "50"))
    return (f"${whole:,}.{cents}" if rng.random() < 0.8 else f"\u20ac{whole:,}.{cents}")


def _entity(domain: str, rng: random.Random) -> tuple[str, dict[str, str]]:
    """A random entity of `domain`: (name, {attr: value}); values are strings without brackets."""
    if domain == "products":
        name = f"{rng.choice(_SERIES)} {rng.choice('ABCDEFGHKLMRSTVXZ')}{rng.randint(2, 990)} {rng.choice(_PTYPES)}"
        return name, {"brand": rng.choice(_BRANDS), "price": _price(rng)}
    if domain == "medical":
        hosp = f"{rng.choice(_HOSP_PLACE)} {rng.choice(_HOSP_KIND)}"
        return f"Dr. {_person(rng)}", {"specialty": rng.choice(_SPECIALTIES), "hospital": hosp}
    if domain == "organisations":
        name = f"{rng.choice(_ORG_A)} {rng.choice(_ORG_B)} {rng.choice(_ORG_C)}"
        return name, {"founded": str(rng.randint(1851, 2019)), "headquarters": rng.choice(_CITIES)}
    if domain == "movies":
        form = rng.randrange(3)
        if form == 0:
            name = f"The {rng.choice(_M_ADJ)} {rng.choice(_M_NOUN)}"
        elif form == 1:
            name = f"{rng.choice(_M_NOUN)} of the {rng.choice(_M_ADJ)} {rng.choice(_M_NOUN)}"
        else:
            name = f"The {rng.choice(_M_OWNER)} {rng.choice(_M_NOUN)}"
        return name, {"year": str(rng.randint(1948, 2023)), "director": _person(rng)}
    raise ValueError(f"domain={domain!r}, allowed: {sorted(DOMAINS)}")


def _core_sentences(domain: str, name: str, attrs: Mapping[str, str], rng: random.Random) -> list[str]:
    """Natural-prose sentences stating the entity's name, its two attributes (verbatim) and 2-3 distractor
    attributes (other properties of the same kind of entity, some of them confusable: a shipping fee next to a
    price, a lead actor next to a director, a renovation year next to a founding year)."""
    c = rng.choice
    if domain == "products":
        b, p = attrs["brand"], attrs["price"]
        intro = c((f"The {name} is one of the more talked-about releases from {b} this season.",
                   f"Among the items reviewed this month was the {name}, built by {b}.",
                   f"{b}, the company behind the {name}, has been promoting it heavily in recent weeks."))
        value = c((f"At the time of writing, the {name} sells for {p}.",
                   f"The list price of the {name} is {p}.",
                   f"Buyers can pick up the {name} for {p} at most retailers."))
        distract = [f"It weighs {rng.randint(1, 9)}.{rng.randint(0, 9)} kg and comes in {c(_COLORS)}.",
                    f"Shipping adds a flat fee of ${rng.randint(5, 40)}.{c(('00', '50', '99'))} in most regions.",
                    f"Owners rate it {rng.randint(30, 49) / 10} out of 5 on average.",
                    f"The manufacturer offers a {rng.randint(1, 5)}-year warranty on parts."]
    elif domain == "medical":
        s, h = attrs["specialty"], attrs["hospital"]
        intro = c((f"{name} has built a reputation among colleagues for careful, unhurried consultations.",
                   f"Patients often ask to be referred to {name}.",
                   f"Few clinicians in the region are as well known as {name}."))
        value = c((f"{name} practises {s} at {h}.",
                   f"As a specialist in {s}, {name} sees patients at {h}.",
                   f"{name}, who works in {s}, is on the staff of {h}."))
        distract = [f"{name.split()[-1]} trained at {c(_SCHOOLS)} and has {rng.randint(4, 35)} years of experience.",
                    f"Besides English, {name.split()[-1]} speaks {c(_LANGS)}.",
                    f"Before that, {name.split()[-1]} spent {rng.randint(2, 9)} years in private practice in "
                    f"{c(_CITIES)}.",
                    f"{name.split()[-1]} also volunteers at a community {c(_SPECIALTIES).lower()} clinic."]
    elif domain == "organisations":
        f_, hq = attrs["founded"], attrs["headquarters"]
        intro = c((f"{name} is frequently cited in industry reports on {c(_SECTORS)}.",
                   f"Analysts have followed {name} closely over the past decade.",
                   f"{name} came up repeatedly in interviews with suppliers."))
        value = c((f"Founded in {f_}, {name} is headquartered in {hq}.",
                   f"{name} was established in {f_} and keeps its head office in {hq}.",
                   f"The headquarters of {name} are in {hq}; the company was founded in {f_}."))
        distract = [f"It employs about {rng.randint(40, 90000):,} people.",
                    f"Its current chief executive is {_person(rng)}.",
                    f"A regional office in {c(_CITIES)} was renovated in {rng.randint(1990, 2023)}.",
                    f"Annual revenue was reported at {rng.randint(2, 900)} million dollars."]
    elif domain == "movies":
        y, d = attrs["year"], attrs["director"]
        intro = c((f"\"{name}\" is a {c(_GENRES)} that critics still argue about.",
                   f"Film societies regularly screen \"{name}\".",
                   f"\"{name}\" was a surprise success on the festival circuit."))
        value = c((f"\"{name}\" was released in {y} and directed by {d}.",
                   f"Directed by {d}, \"{name}\" came out in {y}.",
                   f"{d} directed \"{name}\", which premiered in {y}."))
        distract = [f"The lead role is played by {_person(rng)}.",
                    f"Its running time is {rng.randint(84, 178)} minutes.",
                    f"The score was composed by {_person(rng)}.",
                    f"It grossed roughly {rng.randint(2, 400)} million dollars worldwide."]
    else:
        raise ValueError(f"domain={domain!r}, allowed: {sorted(DOMAINS)}")
    rng.shuffle(distract)
    return [intro, value] + distract[:rng.randint(2, 3)]


_F_SUBJ = ("The committee", "A spokesperson", "Several observers", "Local residents", "The editorial team",
           "Industry veterans", "A recent survey", "The quarterly newsletter", "Visitors", "Most participants")
_F_VERB = ("noted", "pointed out", "remarked", "suggested", "observed", "mentioned", "argued", "reported")
_F_CLAUSE = ("that the weather had delayed several deliveries", "that demand usually peaks before the holidays",
             "that the new regulations took effect in the spring", "that the conference hall was fully booked",
             "that public transport in the area had improved", "that attendance was higher than the year before",
             "that supply chains remained unpredictable", "that the trade fair moved to a larger venue",
             "that many newcomers preferred online workshops", "that the harbour was being dredged again",
             "that the library extended its opening hours", "that volunteers organised a charity run",
             "that the printing costs had gone up", "that several roads were closed for repairs")
_F_TAIL = ("", " during the autumn meeting", " in a brief statement", " without giving further details",
           " in last week's column", " at the regional forum", " according to the minutes")


def _filler(rng: random.Random) -> str:
    """One neutral sentence with no entity names and no attribute-like values."""
    return f"{rng.choice(_F_SUBJ)} {rng.choice(_F_VERB)} {rng.choice(_F_CLAUSE)}{rng.choice(_F_TAIL)}."


def build_text2json_prompt(domain: str, document: str, answer_format: str = "json") -> str:
    """The synthetic `problem` text: a short opening line, the document, then the instruction (which names the
    three keys, asks for one flat JSON array, or one "name | k1 | k2" line per entity, and verbatim values)."""
    d = DOMAINS[domain]
    k1, k2 = d.keys
    head = f"Read the following collection of notes. Some of them describe {d.plural}.\n\n"
    task = (f"\n\nTask: find every {d.entity} described in the notes above and extract, for each one, "
            f"{d.name_desc}, {d.key_desc[0]} ({k1}) and {d.key_desc[1]} ({k2}). Ignore everything that is not a "
            f"{d.entity}. Copy every value exactly as it is written in the notes.\n")
    if answer_format == "json":
        fmt = (f"Answer with a single flat JSON array with one object per {d.entity}, in order of first appearance. "
               f"Each object has exactly the keys \"name\", \"{k1}\" and \"{k2}\", all with string values, like "
               f"{{\"name\": \"...\", \"{k1}\": \"...\", \"{k2}\": \"...\"}}. Output only the JSON array and "
               f"nothing else: no explanation, no code fence, no other square brackets.")
    elif answer_format == "lines":
        fmt = (f"Answer with one line per {d.entity}, in order of first appearance, in the form\n"
               f"name | {k1} | {k2}\nOutput only these lines and nothing else.")
    else:
        raise ValueError(f"answer_format={answer_format!r}, allowed: {FORMATS}")
    return head + document + task + fmt


def _sample_rng(seed: int, index: int, stream: str) -> random.Random:
    # str seeds are hashed with SHA-512 by CPython (version 2 seeding): stable across runs and PYTHONHASHSEED.
    return random.Random(f"kvjax-text2json:{seed}:{index}:{stream}")


@dataclasses.dataclass
class _Unit:
    text: str
    passage: int
    order: float  # position inside the passage (core sentences have integer slots)
    rank: int  # optional units are included when rank < k; core units have rank -1


def _layout(domain: str, targets: list[tuple[str, dict]], distractors: list[tuple[str, str, dict]],
            n_fill: int, rng: random.Random) -> tuple[list[_Unit], int]:
    """All units of the largest document: target passages (core sentences always present), distractor passages
    about entities of other domains (each enters or leaves whole) and neutral filler sentences scattered inside the
    target passages after their first sentence. Optional units get a random rank; rendering with rank < k gives a
    document that grows monotonically with k. Returns (units, number of optional units)."""
    order = ["t"] * len(targets) + ["d"] * len(distractors)
    rng.shuffle(order)  # targets keep their relative order (gold order = order of appearance)
    units: list[_Unit] = []
    optional: list[list[_Unit]] = []
    n_core: dict[int, int] = {}
    ti = di = 0
    for p, kind in enumerate(order):
        if kind == "t":
            name, attrs = targets[ti]
            ti += 1
            sents = _core_sentences(domain, name, attrs, rng)
            units.extend(_Unit(s, p, float(j), -1) for j, s in enumerate(sents))
            n_core[p] = len(sents)
        else:
            dom, name, attrs = distractors[di]
            di += 1
            group = [_Unit(s, p, float(j), 0) for j, s in enumerate(_core_sentences(dom, name, attrs, rng))]
            units.extend(group)
            optional.append(group)
    target_passages = sorted(n_core)
    for _ in range(n_fill):
        p = rng.choice(target_passages)
        u = _Unit(_filler(rng), p, rng.uniform(0.5, n_core[p] - 0.01), 0)
        units.append(u)
        optional.append([u])
    ranks = list(range(len(optional)))
    rng.shuffle(ranks)
    for r, group in zip(ranks, optional):
        for u in group:
            u.rank = r
    return units, len(optional)


def _render(units: list[_Unit], k: int) -> str:
    by_passage: dict[int, list[_Unit]] = {}
    for u in units:
        if u.rank < k:
            by_passage.setdefault(u.passage, []).append(u)
    paras = [" ".join(u.text for u in sorted(us, key=lambda u: u.order)) for _, us in sorted(by_passage.items())]
    return "\n\n".join(paras)


def make_text2json_sample(*, domain: str, count_tokens: CountTokens, target_tokens: int, n_entities: int = 20,
                          seed: int = 0, index: int = 0, answer_format: str = "json", answer_prefix: str = "",
                          tolerance: float = 0.1) -> Sample:
    """One synthetic Text2JSON sample (§2.7), deterministic in (domain, target_tokens, n_entities, seed, index,
    answer_format) and the token counter.

    The document holds one passage per target entity (name and both attributes in prose, plus distractor
    attributes), passages about entities of the other three domains, and neutral filler sentences. The number of
    optional units (filler sentences, distractor passages) is chosen by bisection so that
    `count_tokens(user_text)` lands within `tolerance` of `target_tokens`.

    Gold: json.dumps of [{"name", key1, key2}, ...] in order of appearance; every value appears verbatim in
    `user_text`. Raises ValueError when the target cannot be met (e.g. shorter than the entities alone need).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}, allowed: {sorted(DOMAINS)}")
    if not callable(count_tokens):
        raise ValueError(f"count_tokens={count_tokens!r}, allowed: a callable str -> int (the model's token count "
                         f"of the chat-templated prompt)")
    if answer_format not in FORMATS:
        raise ValueError(f"answer_format={answer_format!r}, allowed: {FORMATS}")
    if not isinstance(n_entities, int) or not 1 <= n_entities <= 200:
        raise ValueError(f"n_entities={n_entities!r}, allowed: int in [1, 200] entities")
    if not isinstance(target_tokens, int) or target_tokens < 64:
        raise ValueError(f"target_tokens={target_tokens!r}, allowed: int >= 64 tokens")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r}, allowed: (0, 1) as a fraction of target_tokens")
    d = DOMAINS[domain]

    # entities: fixed for the sample, independent of how much filler is needed
    erng = _sample_rng(seed, index, f"entities:{domain}:{n_entities}")
    used: set[str] = set()

    def fresh(dom: str) -> tuple[str, dict[str, str]]:
        for _ in range(10_000):
            name, attrs = _entity(dom, erng)
            key = metrics._norm_quote(name).lower()
            if key not in used:
                used.add(key)
                return name, attrs
        raise ValueError(f"cannot draw {n_entities} distinct {dom} names; lower n_entities")

    targets = [fresh(domain) for _ in range(n_entities)]
    others = [x for x in DOMAINS if x != domain]

    def make_prompt(units, k):
        return build_text2json_prompt(domain, _render(units, k), answer_format)

    # grow the pool of optional units until the full document reaches the target, then bisect
    lo_tokens = None
    scale = max(4, target_tokens // 40)
    for attempt in range(12):
        lrng = _sample_rng(seed, index, f"layout:{attempt}")
        n_distract = max(2, scale // 8)
        drng = _sample_rng(seed, index, f"distractors:{attempt}")
        distractors = []
        for j in range(n_distract):
            dom = others[j % len(others)] if j < len(others) else drng.choice(others)
            name, attrs = _entity(dom, drng)
            if metrics._norm_quote(name).lower() in used:
                continue
            distractors.append((dom, name, attrs))
        units, n_opt = _layout(domain, targets, distractors, scale, lrng)
        if lo_tokens is None:
            lo_tokens = count_tokens(make_prompt(units, 0))
            if lo_tokens > target_tokens * (1 + tolerance):
                raise ValueError(f"target_tokens={target_tokens} is too small for n_entities={n_entities}: the "
                                 f"{domain} passages alone take {lo_tokens} tokens; raise target_tokens or lower "
                                 f"n_entities")
        if count_tokens(make_prompt(units, n_opt)) >= target_tokens:
            break
        scale *= 2
    else:
        raise ValueError(f"target_tokens={target_tokens} could not be reached")

    lo, hi = 0, n_opt  # largest k with count <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(make_prompt(units, mid)) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    best_k, best_n = lo, count_tokens(make_prompt(units, lo))
    if lo < n_opt:
        n_up = count_tokens(make_prompt(units, lo + 1))
        if abs(n_up - target_tokens) < abs(best_n - target_tokens):
            best_k, best_n = lo + 1, n_up
    if abs(best_n - target_tokens) > tolerance * target_tokens:
        raise ValueError(f"target_tokens={target_tokens}: closest prompt has {best_n} tokens, outside "
                         f"±{tolerance:.0%}; the smallest unit of text is too coarse for so short a target")
    user_text = make_prompt(units, best_k)

    # gold in order of appearance (targets were laid out in order)
    gold = [{"name": n, d.keys[0]: a[d.keys[0]], d.keys[1]: a[d.keys[1]]} for n, a in targets]
    return Sample(
        id=f"text2json_synth-{seed}-{index:04d}", benchmark="text2json_synth", user_text=user_text,
        gold=json.dumps(gold, ensure_ascii=False), max_new_tokens=MAX_NEW_TOKENS, answer_prefix=answer_prefix,
        meta={"domain": domain, "keys": list(d.keys), "format": answer_format, "n_entities": n_entities,
              "target_tokens": target_tokens, "prompt_tokens": best_n, "seed": seed, "index": index})


def generate_text2json(n_samples: int = 500, *, count_tokens: CountTokens,
                       target_tokens: int | tuple[int, int] = 20_000,
                       n_entities: int | tuple[int, int] = 20, seed: int = 0,
                       domains: Sequence[str] = tuple(DOMAINS), answer_format: str = "json",
                       answer_prefix: str = "", tolerance: float = 0.1) -> list[Sample]:
    """`n_samples` synthetic Text2JSON samples, the domains taken in turn (an even split, as §2.7 suggests).

    Args:
      count_tokens: token count of a user text (the model's tokenizer after its chat template); lengths are
        measured with it and land within `tolerance` of `target_tokens`.
      target_tokens: prompt length in tokens (the paper's data: mean ~20k, range 10k-63.5k), or an inclusive
        (lo, hi) range: each sample then draws its own target uniformly (deterministic per seed and index), e.g.
        (4000, 7000) for a spread of lengths.
      n_entities: entities per sample, or an inclusive (lo, hi) range drawn per sample (the paper's gold answers
        need <= ~905 tokens, about 10-35 objects).
      seed: everything is a deterministic function of the arguments and the counter.
      answer_format: "json" (the paper's: one flat JSON array) or "lines" ("name | attr1 | attr2" per line).
      answer_prefix: text appended after the chat template's generation prompt (e.g. '[{"name": "' for json or
        "" for lines); the scorer prepends it to the generation.
    """
    for dom in domains:
        if dom not in DOMAINS:
            raise ValueError(f"domains contains {dom!r}; allowed: {sorted(DOMAINS)}")
    if not domains:
        raise ValueError("domains is empty; allowed: a non-empty subset of " + str(sorted(DOMAINS)))
    if not isinstance(target_tokens, int):
        if len(target_tokens) != 2 or not 1 <= int(target_tokens[0]) <= int(target_tokens[1]):
            raise ValueError(f"target_tokens={target_tokens!r} tokens; allowed: an int >= 1 or (lo, hi) with "
                             f"1 <= lo <= hi")
    out = []
    for i in range(n_samples):
        if isinstance(target_tokens, int):
            target = int(target_tokens)
        else:
            target = _sample_rng(seed, i, "length").randint(int(target_tokens[0]), int(target_tokens[1]))
        if isinstance(n_entities, int):
            n = n_entities
        else:
            lo, hi = n_entities
            if not 1 <= lo <= hi:
                raise ValueError(f"n_entities={n_entities!r}, allowed: (lo, hi) with 1 <= lo <= hi")
            n = _sample_rng(seed, i, "count").randint(lo, hi)
        out.append(make_text2json_sample(domain=domains[i % len(domains)], count_tokens=count_tokens,
                                         target_tokens=target, n_entities=n, seed=seed, index=i,
                                         answer_format=answer_format, answer_prefix=answer_prefix,
                                         tolerance=tolerance))
    return out


# =================================================================================================================
# Registry entries
# =================================================================================================================


def score_text2json(sample: Sample, prediction: str) -> dict[str, Any]:
    """{"score": IoU in [0, 1], or None for a duplicate-name gold}; the answer prefix is prepended first, and the
    sample's meta["format"] picks the JSON or the line scorer."""
    text = sample.answer_prefix + (prediction if isinstance(prediction, str) else "")
    if sample.meta.get("format", "json") == "lines":
        return {"score": metrics.text2json_lines_iou(text, sample.gold)}
    return {"score": metrics.text2json_iou(text, sample.gold)}


def aggregate_text2json(samples: Sequence[Sample], scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The authors' `average_score` (×100, duplicate-name samples excluded), plus one per domain when known."""
    out = metrics.text2json_aggregate([s["score"] for s in scores])
    domains = sorted({s.meta.get("domain") for s in samples if s.meta.get("domain")})
    for dom in domains:
        sub = [sc["score"] for s, sc in zip(samples, scores) if s.meta.get("domain") == dom]
        out[f"average_score_{dom}"] = metrics.text2json_aggregate(sub)["average_score"]
    return out


class _Text2JSON:
    name = "text2json"

    def build(self, **params):
        return load_text2json(**params)

    def score(self, sample, prediction):
        return score_text2json(sample, prediction)

    def aggregate(self, samples, scores):
        return aggregate_text2json(samples, scores)


class _Text2JSONSynth(_Text2JSON):
    name = "text2json_synth"
    uses_count_tokens = True

    def build(self, **params):
        return generate_text2json(**params), []


register(_Text2JSON(), data="text2json")
register(_Text2JSONSynth())
