#!/usr/bin/env python3
"""Generate the embedded default corpus of Sphana under ``data/`` (deterministic, stdlib only).

The corpus describes one fictional research field, *tidal acoustics*, from the hand-written
knowledge base in ``scripts/corpus_kb.py``. Documents are rendered from several sentence
templates per fact type, picked with a seeded ``random.Random``; every sentence that states a fact
is recorded with its character offsets so that the gold questions (``gold/questions.jsonl``) and
relation mentions (``gold/relations.jsonl``) point at exact spans of the section text.

Usage::

    python scripts/make_corpus.py                # writes <repo>/data/{documents,gold,README.md}
    python scripts/make_corpus.py --out /tmp/d   # somewhere else
    python scripts/make_corpus.py --check-determinism

Only ``<out>/documents``, ``<out>/gold`` and ``<out>/README.md`` are written (the two folders are
deleted and recreated). ``verify`` re-reads the written files with independent parsers and checks
every count and offset; it runs at the end of each generation.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import re
import shutil
import sys
import tempfile
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus_kb as KB  # noqa: E402

# Gold sentence spans must be the sentences the ingester itself finds.
from sphana.documents import split_sentences  # noqa: E402

SEED = 1207
N_QUESTIONS = 400
MAX_GROUP_DOCS = 8  # max documents linked together by multi-passage questions (see datasets.py)
FORMATS = ("md", "txt", "json", "jsonl")

REPO = Path(__file__).resolve().parent.parent

# --- entities ----------------------------------------------------------------------------------

PERSON, ORG, LOCATION, METHOD, DATASET, VENUE, INSTRUMENT = (
    "PERSON", "ORG", "LOCATION", "METHOD", "DATASET", "VENUE", "INSTRUMENT")


ARTICLE_TYPES = {"ORG", "VENUE", "DATASET", "INSTRUMENT"}  # rendered as "the <name>"
_HAS_THE = re.compile(r"(?i)\bthe (first |\d{4} )?$")


class Ent:
    __slots__ = ("key", "name", "type", "article")

    def __init__(self, key: str, name: str, type_: str):
        self.key, self.name, self.type = key, name, type_
        self.article = type_ in ARTICLE_TYPES

    def surname(self) -> str:
        return self.name.split()[-1]


ENT: dict[str, Ent] = {}
REC: dict[str, dict] = {}  # key -> KB record


def _register(records, type_, name_field="name"):
    for r in records:
        assert r["key"] not in ENT, f"duplicate key {r['key']}"
        ENT[r["key"]] = Ent(r["key"], r[name_field], type_)
        REC[r["key"]] = r


_register(KB.COUNTRIES, LOCATION)
_register(KB.CITIES, LOCATION)
_register(KB.SITES, LOCATION)
_register(KB.FUNDERS, ORG)
_register(KB.LABS, ORG)
_register(KB.PEOPLE, PERSON)
_register(KB.INSTRUMENTS, INSTRUMENT)
_register(KB.VENUES, VENUE)
_register(KB.METHODS, METHOD)
_register(KB.DATASETS, DATASET)
_names = [e.name for e in ENT.values()]
assert len(set(_names)) == len(_names), "entity names must be unique"

EDITIONS: dict[str, dict] = {}
for _v in KB.VENUES:
    for (_y, _c, _chair, _key, _award, _talks) in _v["editions"]:
        EDITIONS[f"{_v['key']}-{_y}"] = {
            "key": f"{_v['key']}-{_y}", "venue": _v["key"], "year": _y, "city": _c,
            "chair": _chair, "keynote": _key, "award": _award, "talks": _talks}
PAPERS = {p["key"]: p for p in KB.PAPERS}


def slug(text: str) -> str:
    return KB._slug(text)


# --- indexes over the knowledge base -------------------------------------------------------------

def _index():
    ix = defaultdict(lambda: defaultdict(list))
    for p in KB.PEOPLE:
        ix["staff"][p["lab"]].append(p["key"])
        if p["advisor"]:
            ix["students"][p["advisor"]].append(p["key"])
    for m in KB.METHODS:
        ix["methods_by_dev"][m["dev"]].append(m["key"])
        ix["methods_by_lab"][REC[m["dev"]]["lab"]].append(m["key"])
        if m["parent"]:
            ix["children"][m["parent"]].append(m["key"])
        for d in m["evals"]:
            ix["evaluated_by"][d].append(m["key"])
    for d in KB.DATASETS:
        ix["datasets_by_lab"][d["lab"]].append(d["key"])
        ix["datasets_by_site"][d["site"]].append(d["key"])
        ix["datasets_by_instrument"][d["instrument"]].append(d["key"])
        assert d["best"] in ix["evaluated_by"][d["key"]], d["key"]
    for lab in KB.LABS:
        ix["labs_by_city"][lab["city"]].append(lab["key"])
        ix["grantees"][lab["funder"]].append(lab["key"])
        if lab["funder2"]:
            ix["grantees2"][lab["funder2"]].append(lab["key"])
        for f in lab["founders"]:
            ix["labs_founded"][f].append(lab["key"])
    for s in KB.SITES:
        ix["sites_by_city"][s["city"]].append(s["key"])
    for c in KB.CITIES:
        ix["cities_by_country"][c["country"]].append(c["key"])
    for f in KB.FUNDERS:
        ix["funders_by_city"][f["city"]].append(f["key"])
    for i in KB.INSTRUMENTS:
        ix["instruments_by_designer"][i["designer"]].append(i["key"])
    for v in KB.VENUES:
        ix["venues_founded"][v["founder"]].append(v["key"])
    for ed in EDITIONS.values():
        ix["editions_by_city"][ed["city"]].append(ed["key"])
        ix["events"][ed["chair"]].append(("chair", ed["key"], None))
        ix["events"][ed["keynote"]].append(("keynote", ed["key"], None))
        ix["events"][ed["award"][0]].append(("award", ed["key"], ed["award"][1]))
        for person, m in ed["talks"]:
            ix["events"][person].append(("talk", ed["key"], m))
    for paper in KB.PAPERS:
        authors = paper["authors"]
        for a in authors:
            ix["papers_by_person"][a].append(paper["key"])
            for b in authors:
                if a != b and b not in ix["coauthors"][a]:
                    ix["coauthors"][a].append(b)
    for person in ix["events"]:
        ix["events"][person].sort(key=lambda e: (EDITIONS[e[1]]["year"], e[1], e[0]))
    return ix


IX = _index()


def lab_of(person: str) -> str:
    return REC[person]["lab"]


def city_of(key: str) -> str:
    return REC[key]["city"]


def country_of(city: str) -> str:
    return REC[city]["country"]


# --- sentence templates ---------------------------------------------------------------------------
# A pool holds templates that share slots. Spec: "a>b:label" declares a relation (e1=a, e2=b),
# "a~b" leaves the pair unannotated (the relation is implied but not stated); every other pair of
# entity slots in the sentence becomes a ``no_relation`` mention. "*x" stands for every item of a
# list slot. Facts: (kind, subject slot | (slots) | "@ctx", answer slot) -> question material.

POOLS: dict[str, dict] = {}


def pool(name, facts, spec, *templates):
    tpls = []
    for t in templates:
        text, s = (t, spec) if isinstance(t, str) else t
        tpls.append((text, _parse_spec(s)))
    POOLS[name] = {"facts": facts, "tpls": tpls}


def _parse_spec(spec):
    out = []
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        if "~" in item:
            a, b = item.split("~")
            out.append(("skip", a.strip(), b.strip(), None))
        else:
            pair, label = item.split(":")
            a, b = pair.split(">")
            out.append(("rel", a.strip(), b.strip(), label.strip()))
    return out


# people -------------------------------------------------------------------------------------------
pool("intro_person", [], "",
     "{p} is a {role} whose work focuses on {t1}.",
     "{p} is a tidal acoustician specialising in {t1}.",
     "{p} studies {t1}, mostly in shallow estuaries.",
     "As a {role}, {p} works on {t1} and related problems.")
pool("works_at", [("lab", "p", "o"), ("join_year", "p", "y")], "p>o:works_at",
     "{p} joined {o} in {y} as a {role}.",
     "Since {y}, {p} has worked as a {role} at {o}.",
     "{p} has been a {role} at {o} since {y}.",
     "In {y}, {p} took up a {role} post with {o}.",
     "{o} hired {p} as a {role} in {y}.",
     "{p} moved to {o} in {y} and has stayed there as a {role}.")
pool("hometown", [("hometown", "p", "c")], "",
     "{p} grew up in {c}.",
     "{p} was raised in the coastal city of {c}.",
     "Born and raised in {c}, {p} first heard a hydrophone recording as a teenager.",
     "{p} comes originally from {c}.")
pool("background", [("background", "p", "bg")], "",
     "Before turning to acoustics, {p} trained as a {bg}.",
     "{p} started out as a {bg} and only later moved into underwater sound.",
     "{Pr} first worked as a {bg} before turning to tidal acoustics.")
pool("advised", [("advisor", "p", "a"), ("phd_year", "p", "y")], "p>a:advised_by",
     "{p} completed a doctorate under the supervision of {a} in {y}.",
     "{p} was advised by {a} and defended a thesis in {y}.",
     "{a} supervised the doctoral research of {p}, which ended with a thesis defence in {y}.",
     "As a doctoral student, {p} trained with {a}, graduating in {y}.",
     "{p} wrote a doctoral thesis with {a} as advisor and finished it in {y}.")
pool("phd_noadv", [("phd_year", "p", "y")], "",
     "{p} received a doctorate in {y} from a university abroad.",
     "{p} completed doctoral studies in {y}, working largely alone on field data.",
     "{p} finished a doctoral thesis in {y}.")
pool("supervised", [("advisor", "*q", "a")], "*q>a:advised_by",
     "{a} has supervised the doctoral work of {*q}.",
     "Former doctoral students of {a} include {*q}.",
     "The doctoral students of {a} included {*q}.",
     "{a} was the doctoral advisor of {*q}.")
pool("developed", [("developer", "m", "p"), ("method_year", "m", "y")], "p>m:developed",
     "{p} developed {m} in {y}.",
     "In {y}, {p} introduced {m}.",
     "{m} was developed by {p} in {y}.",
     "{p} is credited with {m}, a method first described in {y}.",
     "{m} was first proposed by {p} in {y}.",
     "{p} designed {m}, which was published in {y}.")
pool("person_visit", [], "",
     "{p} has spent several research visits at {o}.",
     "{p} often collaborates with colleagues at {o} but has never been employed there.",
     "{p} sits on the advisory board of {o}.")
pool("coauthor", [], "p>*q:coauthored_with; *q~*q",
     "{p} has co-authored several papers with {*q}.",
     "{p} has published jointly with {*q}.",
     "Regular co-authors of {p} include {*q}.",
     "{p} frequently writes papers together with {*q}.")
pool("founded_single", [("founder", "o", "p"), ("founded_year", "o", "y")], "p>o:founded",
     "{p} founded {o} in {y}.",
     "{o} was founded by {p} in {y}.",
     "{o} was established in {y} by {p}.",
     "In {y}, {p} set up {o}.",
     "{p} established {o} in {y} with a handful of hydrophones and a borrowed boat.")
pool("founded_co", [("cofounder", ("o", "p"), "q"), ("cofounder", ("o", "q"), "p"),
                    ("founded_year", "o", "y")], "p>o:founded; q>o:founded",
     "{p} and {q} founded {o} in {y}.",
     "{o} was founded in {y} by {p} and {q}.",
     "In {y}, {p} and {q} jointly established {o}.",
     "{p} co-founded {o} with {q} in {y}.")
pool("founded_venue", [("venue_founder", "v", "p"), ("venue_year", "v", "y")], "p>v:founded",
     "{v} was founded by {p} in {y}.",
     "{p} started {v} in {y}.",
     "The {v} series goes back to {y}, when {p} founded it.",
     "{p} launched {v} in {y}.")

# events -------------------------------------------------------------------------------------------
pool("keynote_person", [("keynote", "@ed", "p"), ("edition_city", "@ed", "c")],
     "p>v:presented_at; v>c:held_in; p~c",
     "{p} gave the keynote address at {v} in {y}.",
     "In {y}, {p} was the keynote speaker at {v}.",
     "{p} delivered a keynote at the {y} meeting of {v}.",
     "{p} gave the keynote when {v} met in {c} in {y}.",
     "In {y}, {p} travelled to {c} to give the keynote at {v}.")
pool("keynote_aff", [("keynote", "@ed", "p"), ("lab", "p", "o")],
     "p>v:presented_at; p>o:works_at",
     "{p} of {o} delivered the keynote at {v} in {y}.",
     "The keynote at {v} in {y} was given by {p} from {o}.",
     "{v} opened in {y} with a keynote by {p} of {o}.")
pool("talk", [("edition_city", "@ed", "c")], "p>v:presented_at; m>v:presented_at; p~m",
     ("When {v} met in {c} in {y}, {p} presented {m} there.",
      "p>v:presented_at; m>v:presented_at; v>c:held_in; p~m; p~c; m~c"),
     "At {v} in {y}, {p} presented {m}.",
     "{p} gave a talk on {m} at {v} in {y}.",
     ("{p} presented new results obtained with {m} at {v} in {y}.",
      "p>v:presented_at; p~m; m~v"),
     "{m} was the subject of a talk by {p} at {v} in {y}.")
pool("award", [("award", "@ed", "p")], "p~v; m~v; p~m",
     "{p} won the best paper award at {v} in {y} for work on {m}.",
     "The best paper award of {v} in {y} went to {p} for a study of {m}.",
     "At {v} in {y}, {p} received the best paper award for work on {m}.")
pool("chair", [("chair", "@ed", "p"), ("edition_city", "@ed", "c")], "",
     ("{p} chaired the programme committee when {v} was held in {c} in {y}.",
      "v>c:held_in; p~c"),
     "{p} chaired the programme committee of {v} in {y}.",
     "The programme of {v} in {y} was assembled by a committee chaired by {p}.",
     "{p} served as programme chair for {v} in {y}.")
pool("sponsored", [("sponsor", "@ed", "f")], "v>f:funded_by",
     "{v} was sponsored by {f} in {y}.",
     "In {y}, {f} covered most of the costs of {v}.",
     "Financial support for {v} in {y} came from {f}.")
pool("sponsor_series", [], "v>f:funded_by",
     "{f} also sponsors {v}.",
     "Every edition of {v} receives financial support from {f}.",
     "{v} is funded largely by {f}.")
pool("held_in", [("edition_city", "@ed", "c")], "v>c:held_in",
     "The {y} edition of {v} was held in {c}.",
     "{v} met in {c} in {y}.",
     "In {y}, {v} took place in {c}.",
     "{c} hosted {v} in {y}.")

# labs ---------------------------------------------------------------------------------------------
pool("lab_loc_short", [("lab_city", "o", "c")], "o>c:located_in",
     "{o} is located in {c}.",
     "{o} has its offices in {c}.",
     "The premises of {o} are in {c}.",
     "{o} operates from a waterfront building in {c}.",
     "{o} is based in {c}.")
pool("lab_loc_country", [("lab_city", "o", "c"), ("country", "c", "k")],
     "o>c:located_in; c>k:located_in; o~k",
     "{o} is {kind} located in {c}, {k}.",
     "Based in the port of {c} in {k}, {o} is {kind} devoted to tidal acoustics.",
     "{o} is {kind} in {c}, a coastal city of {k}.")
pool("staff", [("lab", "*p", "o")], "*p>o:works_at",
     "Researchers at {o} include {*p}.",
     "The staff of {o} includes {*p}.",
     "{o} currently employs {*p}.",
     "The current team at {o} includes {*p}, among others.")
pool("lab_visit", [], "",
     "{o} regularly hosts visiting researchers from {o2}.",
     "Staff from {o} and {o2} meet each spring for a joint seminar.",
     "{o} shares a small research vessel with {o2}.")
pool("staff_size", [("staff_size", "o", "n")], "",
     "About {n} people work at {o}, including technicians and students.",
     "{o} has a staff of roughly {n} people.",
     "Roughly {n} people, counting students, work at {o}.")
pool("funded_primary", [("funder", "o", "f")], "o>f:funded_by",
     "{o} receives most of its funding from {f}.",
     "The main funder of {o} is {f}.",
     "{f} provides the core funding of {o}.",
     "Core support for {o} comes from {f}.",
     "{o} is funded chiefly by {f}.")
pool("funded_secondary", [], "o>f:funded_by",
     "{o} also receives smaller project grants from {f}.",
     "Additional project money for {o} comes from {f}.",
     "{f} supports some individual projects at {o}.")
pool("grantees", [("funder", "*o", "f")], "*o>f:funded_by",
     "{f} is the main funder of {*o}.",
     "Core grants from {f} go to {*o}.",
     "Labs that rely mainly on {f} include {*o}.")
pool("developed_at_lab", [("developer", "m", "p")], "p>m:developed; m~o; p~o",
     "{m} was developed at {o} by {p}.",
     "At {o}, {p} developed {m}.",
     "{o} is where {p} developed {m}.")
pool("dev_lab", [("lab", "p", "o")], "p>o:works_at",
     "At the time, {p} was working at {o}.",
     "{p} was already a member of {o} when the work began.",
     "The work was done while {p} was on the staff of {o}.")
pool("created_collected", [("creator", "d", "o"), ("site", "d", "s")],
     "d>s:collected_at; o~s",
     "{o} assembled {d} at {s}.",
     "Researchers from {o} recorded {d} at {s}.",
     "{d} was collected at {s} by a team from {o}.")

# methods ------------------------------------------------------------------------------------------
pool("task", [("task", "m", "task")], "",
     "{m} is a technique for {task}.",
     "{m} is used for {task}.",
     "The purpose of {m} is {task}.")
pool("extends", [("parent", "m", "m2")], "m>m2:extends",
     "{m} extends {m2} by {how}.",
     "{m} builds directly on {m2}, {how}.",
     "{m} is an extension of {m2} that works by {how}.",
     "{m2} served as the starting point for {m}, which differs by {how}.",
     "Technically, {m} is an extension of {m2}.",
     "{m2} was later extended into {m}.")
pool("method_venue", [("method_venue", "m", "v"), ("method_year", "m", "y")], "m>v:presented_at",
     "{m} was first presented at {v} in {y}.",
     "The first public description of {m} was a talk at {v} in {y}.",
     "{m} made its debut at {v} in {y}.",
     "In {y}, {v} saw the first presentation of {m}.")
pool("evaluated", [], "m>*d:evaluated_on",
     "{m} has been evaluated on {*d}.",
     "Published results for {m} cover {*d}.",
     "Benchmarks for {m} include {*d}.",
     "{m} was tested on {*d}.")
pool("evaluated_ds", [], "*m>d:evaluated_on",
     "Methods evaluated on {d} include {*m}.",
     "{d} has been used to evaluate {*m}.",
     "Published results on {d} exist for {*m}.")
pool("comparison", [], "m>d:evaluated_on; m2>d:evaluated_on",
     "On {d}, {m} reduced the localisation error by {x} percent relative to {m2}.",
     "{m} outperformed {m2} on {d} by a margin of {x} percent.",
     "Compared with {m2}, {m} lowered the error rate on {d} by {x} percent.")
pool("best", [("best", "d", "m")], "m>d:evaluated_on",
     "The strongest published result on {d} belongs to {m}.",
     "{m} currently holds the best reported score on {d}.",
     "On {d}, the leading method is {m}.",
     "No method has yet beaten {m} on {d}.")
pool("not_tested", [], "",
     "{m} has not yet been tested on {d}.",
     "No results for {m} on {d} have been published so far.",
     "{m} has never been applied to {d}, despite requests from users.")
pool("window", [("window", "m", "w")], "",
     "{m} computes spectra over windows of {w}.",
     "The analysis window used by {m} is {w} long.",
     "By default, {m} works on windows of {w}.")

# datasets -----------------------------------------------------------------------------------------
pool("collected", [("site", "d", "s"), ("collect_year", "d", "y")], "d>s:collected_at",
     "{d} was recorded at {s} in {y}.",
     "The recordings in {d} were made at {s} during {y}.",
     "{d} was collected at {s}, with the main campaign in {y}.",
     "Field teams gathered {d} at {s} in {y}.")
pool("created", [("creator", "d", "o")], "",
     "{d} was assembled by {o}.",
     "Researchers at {o} compiled {d}.",
     "{o} produced {d} and still maintains it.")
pool("instrument_used", [("instrument", "d", "i")], "d>i:recorded_with",
     "All recordings in {d} were made with {i}.",
     "{d} was captured using {i}.",
     "The {i} served as the main recorder for {d}.",
     "Every file in {d} comes from {i}.")
pool("instrument_datasets", [("instrument", "*d", "i")], "*d>i:recorded_with",
     "{i} was used to record {*d}.",
     "Datasets captured with {i} include {*d}.",
     "The recordings in {*d} were made with {i}.")
pool("hours", [("hours", "d", "h")], "",
     "{d} contains {h} of underwater audio.",
     "{d} comprises {h} of recordings.",
     "In total, {d} holds {h} of sound.")
pool("sample_rate", [("sample_rate", "d", "k")], "",
     "The audio in {d} is sampled at {k}.",
     "Files in {d} use a sampling rate of {k}.",
     "{d} was recorded at a sampling rate of {k}.")

# places -------------------------------------------------------------------------------------------
pool("country", [("country", "c", "k")], "c>k:located_in",
     "{c} is a port city in {k}.",
     "{c} lies on the coast of {k}.",
     "{c} is one of the larger coastal towns of {k}.")
pool("city_feature", [("feature", "c", "ft")], "",
     "{c} is known for {ft}.",
     "Visitors to {c} usually remember {ft}.",
     "The city of {c} is famous for {ft}.")
pool("city_labs", [("lab_city", "*o", "c")], "*o>c:located_in",
     "{c} is home to {*o}.",
     "Research labs based in {c} include {*o}.",
     "{c} hosts {*o}.")
pool("city_funder", [("funder_city", "f", "c")], "f>c:located_in",
     "{c} is also the seat of {f}.",
     "{f} has its head office in {c}.",
     "The headquarters of {f} are in {c}.")
pool("site_loc", [("site_city", "s", "c")], "s>c:located_in",
     "{s} lies a short distance from {c}.",
     "{s} is located just outside {c}.",
     "{s} is close to {c}.")
pool("site_loc_country", [("site_city", "s", "c"), ("country", "c", "k")],
     "s>c:located_in; c>k:located_in; s~k",
     "{s} is {kind} near {c}, in {k}.",
     "Near {c} in {k} lies {s}, {kind}.",
     "{s}, {kind}, is located close to {c} in {k}.")
pool("site_visit", [], "",
     "Field teams from {o} regularly service moorings at {s}.",
     "{o} keeps a small boat for trips to {s}.",
     "Students from {o} often practise deployments at {s}.")
pool("tidal_range", [("tidal_range", "s", "r")], "",
     "The tidal range at {s} reaches about {r}.",
     "At spring tides the water level at {s} changes by about {r}.",
     "{s} has a tidal range of roughly {r}.")
pool("seabed", [("seabed", "s", "sb")], "",
     "The seabed at {s} consists mostly of {sb}.",
     "At {s}, the bottom is made up of {sb}.",
     "Divers describe the floor of {s} as {sb}.")
pool("country_intro", [], "",
     "{k} is a maritime country with {about}.",
     "The coast of {k} is known for {about}.",
     "Geographically, {k} is a country of {about}.")
pool("country_list", [("country", "*c", "k")], "*c>k:located_in",
     "The main coastal cities of {k} are {*c}.",
     "{*c} are the principal ports of {k}.",
     "Research in {k} is concentrated in {*c}.")
pool("funder_loc_country", [("funder_city", "f", "c"), ("country", "c", "k")],
     "f>c:located_in; c>k:located_in; f~k",
     "{f} is headquartered in {c}, {k}.",
     "From its offices in {c}, {f} funds research across {k}.",
     "{f} operates from {c} in {k}.")

# funders ------------------------------------------------------------------------------------------
pool("funder_loc", [("funder_city", "f", "c")], "f>c:located_in",
     "{f} is headquartered in {c}.",
     "The head office of {f} is in {c}.",
     "{f} has its headquarters in {c}.")
pool("funder_year", [("funder_year", "f", "y")], "",
     "{f} was established in {y}.",
     "{f} was set up in {y}.",
     "{f} dates back to {y}.")
pool("funder_kind", [], "",
     "{f} is {kind}.",
     "Formally, {f} is {kind}.")

# instruments --------------------------------------------------------------------------------------
pool("instr_designed", [("designer", "i", "p"), ("instrument_year", "i", "y")],
     "p>i:developed",
     "{p} designed {i} in {y}.",
     "{i} was designed by {p} in {y}.",
     "The first {i} was built in {y} to a design by {p}.",
     "In {y}, {p} developed {i}.")
pool("instr_lab", [("instrument_lab", "i", "o")], "",
     "{i} is built in the workshop of {o}.",
     "{o} manufactures {i} in small batches.",
     "Units of {i} are assembled at {o}.")
pool("instr_kind", [], "",
     "{i} is {kind}.",
     "In short, {i} is {kind}.")
pool("instr_weight", [("weight", "i", "wt")], "",
     "{i} weighs about {wt} in air.",
     "In air, {i} has a mass of roughly {wt}.")
pool("instr_depth", [("depth_rating", "i", "dp")], "",
     "The housing of {i} is rated to a depth of {dp}.",
     "{i} can operate down to {dp}.")

# editions -----------------------------------------------------------------------------------------
pool("attendance", [("attendance", "@ed", "n")], "",
     "About {n} participants attended the {y} meeting.",
     "The {y} edition drew roughly {n} participants.",
     "Roughly {n} people registered for {v} in {y}.")

# papers -------------------------------------------------------------------------------------------
pool("paper_applies", [("paper_dataset", "@paper", "d")], "m>d:evaluated_on",
     "The paper applies {m} to {d}.",
     "The study evaluates {m} on {d}.",
     "Experiments in the paper run {m} on recordings from {d}.")
pool("paper_authors", [], "*p>*p:coauthored_with",
     "The paper was written by {*p}.",
     "{*p} are the authors of the paper.",
     "The paper is the joint work of {*p}.")
pool("first_author", [("first_author", "@paper", "p")], "",
     "{p} is listed as the first author.",
     "The first author is {p}.",
     "{p} led the writing as first author.")
pool("paper_aff", [("lab", "p", "o")], "p>o:works_at",
     "{p} is affiliated with {o}.",
     "At the time of writing, {p} was based at {o}.",
     "{p} carried out the work at {o}.")
pool("paper_venue", [("paper_venue", "@paper", "v"), ("paper_year", "@paper", "y")], "",
     "It appeared at {v} in {y}.",
     "The paper was presented at {v} in {y}.",
     "The work was published in the proceedings of {v} in {y}.")

# descriptive sentences (no facts, at most the topic entity) ---------------------------------------
FILLERS = {
    "person": [
        "{Pos} research centres on {t1}.",
        "{Pr} is particularly interested in {t1} and {t2}.",
        "Much of {pos} recent work deals with {t2}.",
        "{Pr} spends several weeks each year on field campaigns aboard small survey boats.",
        "{Pr} teaches a graduate seminar on {t1}.",
        "Colleagues describe {pos} field notebooks as unusually thorough.",
        "{Pr} serves on the editorial board of a regional journal on coastal sound.",
        "{Pos} group shares most of its analysis code with other researchers on request.",
        "{Pr} often argues that long recordings matter more than clever models.",
        "{Pr} prefers simple instruments that can survive a winter at sea.",
    ],
    "lab": [
        "The group maintains a set of permanent moorings along the coast.",
        "Its researchers publish mainly on {t1}.",
        "Every other summer the lab runs a field school for graduate students.",
        "A small workshop on site builds custom mounts and cable housings.",
        "The lab keeps a shared archive of raw recordings that dates back several decades.",
        "Its research boat is a converted fishing vessel.",
        "Weekly reading groups discuss new work on {t2}.",
        "The building has a seawater tank used to calibrate hydrophones.",
    ],
    "method": [
        "It assumes that the dominant noise source changes with the phase of the tide.",
        "A reference implementation runs comfortably on a laptop.",
        "The method is normally applied after the hydrophones have been calibrated.",
        "Critics note that it can struggle during spring tides, when currents are strongest.",
        "Practitioners value it for its small number of tuning parameters.",
        "Its output is a set of time-frequency masks that can be inspected by eye.",
        "Several field teams use it as a routine first processing step.",
        "The computational cost grows linearly with the length of the recording.",
    ],
    "dataset": [
        "Annotators marked {ann} in a subset of the files.",
        "The data are released under a research-only licence.",
        "A held-out test split of roughly {pct} percent is provided.",
        "Metadata include water depth, tidal phase and wind speed for every file.",
        "Some files contain gaps caused by storms or battery failures.",
        "Each file covers one full tidal cycle.",
        "A short tutorial explains how to load the files and their labels.",
        "Users are asked to report the exact version of the files they used.",
    ],
    "city": [
        "The harbour sees heavy ferry traffic during the summer months.",
        "The old town sits on a ridge above the water.",
        "Winters are mild but storms are frequent.",
        "A maritime museum near the docks displays early hydrophones.",
        "Its tidal range is among the largest in the region.",
        "Fishing boats still land their catch at the old quay every morning.",
    ],
    "site": [
        "Strong currents make deployments there difficult.",
        "Seals and porpoises are regularly heard in the recordings.",
        "Moorings at the site must be recovered before the autumn storms.",
        "Shipping traffic is light except during the summer months.",
        "Visibility under water is poor for most of the year.",
    ],
    "venue": [
        "The programme featured {k} oral sessions and a poster evening.",
        "A field excursion to a nearby mooring site was organised on the final day.",
        "Several sessions focused on {t1}.",
        "A panel discussion debated how to share long recordings between labs.",
        "Student volunteers ran the registration desk.",
        "The closing session looked ahead to the next meeting.",
    ],
    "funder": [
        "Its budget for marine acoustics is modest but stable.",
        "Calls for proposals are issued every spring.",
        "Grants typically run for three to five years.",
        "The agency also supports public outreach on ocean noise.",
        "Proposals are reviewed by panels that include foreign experts.",
    ],
    "instrument": [
        "Calibration is performed in a water tank before each deployment.",
        "Its batteries last roughly {wk} weeks.",
        "Data are stored on removable flash cards.",
        "Spare parts are kept at most of the labs that use it.",
        "The design has been revised several times since the first prototype.",
    ],
    "paper": [
        "The authors release their evaluation scripts.",
        "Results are reported separately for spring and neap tides.",
        "An appendix describes the calibration procedure in detail.",
        "The paper is often cited as a reference point for work on {t1}.",
        "Reviewers praised the careful description of the field data.",
    ],
    "country": [
        "Ocean research has a long tradition there.",
        "Most field work takes place between April and October.",
        "Its universities train many of the engineers who build hydrophones.",
    ],
}

ANNOTATIONS = ["bore arrivals", "fish calls", "ship passages", "seal vocalisations",
               "sediment bursts", "rain noise"]

HEADINGS = {
    "people": {
        "overview": ["Overview", "Profile", "Background", "At a glance"],
        "career": ["Career", "Appointments", "Positions held", "Professional history"],
        "training": ["Education", "Doctoral training", "Training", "Academic path"],
        "research": ["Research contributions", "Methods and tools", "Key contributions"],
        "collab": ["Collaborations", "Co-authors", "Collaborators", "Joint work"],
        "events": ["Conferences", "Talks and service", "Meetings", "Community service"],
    },
    "labs": {
        "overview": ["Overview", "About", "Profile"],
        "history": ["History", "Origins", "Founding"],
        "people": ["People", "Staff", "Team"],
        "funding": ["Funding", "Financial support", "Sponsors"],
        "methods": ["Methods", "Research output", "Techniques developed"],
        "data": ["Data collections", "Datasets", "Field recordings"],
    },
    "methods": {
        "summary": ["Summary", "Overview", "In brief"],
        "origin": ["Origins", "History", "Background"],
        "evaluation": ["Evaluation", "Benchmarks", "Results"],
        "later": ["Later work", "Descendants", "Extensions"],
        "technique": ["Technique", "How it works", "Practical notes"],
    },
    "datasets": {
        "overview": ["Description", "Overview", "Summary"],
        "collection": ["Collection", "Provenance", "Recording campaign"],
        "benchmarks": ["Benchmarks", "Use in evaluations", "Results"],
        "access": ["Access", "Usage notes", "Licence and format"],
    },
    "cities": {
        "overview": ["Overview", "Geography", "About the city"],
        "institutions": ["Research institutions", "Labs and agencies", "Science"],
        "sites": ["Field sites", "Nearby sites and data", "Recording sites"],
        "events": ["Events", "Conferences hosted", "Meetings"],
    },
    "sites": {
        "overview": ["Overview", "Location", "Setting"],
        "recordings": ["Recordings", "Datasets", "Field work"],
        "environment": ["Environment", "Conditions", "Physical setting"],
    },
    "countries": {
        "overview": ["Overview", "Geography"],
        "cities": ["Cities", "Coastal cities"],
        "funding": ["Research funding", "Funding agencies"],
    },
    "venues": {
        "overview": ["Overview", "About this edition", "Summary"],
        "programme": ["Programme", "Talks", "Highlights"],
        "awards": ["Awards", "Prizes", "Best paper"],
        "organisation": ["Organisation", "Committee", "Organizers"],
    },
    "funders": {
        "overview": ["Overview", "About", "Profile"],
        "grants": ["Grants", "Funded labs", "Grantees"],
        "policy": ["Policy", "Funding rules", "How funding works"],
    },
    "instruments": {
        "overview": ["Overview", "Design", "Origins"],
        "deployments": ["Deployments", "Use in datasets", "Field use"],
        "specs": ["Specifications", "Technical notes", "Maintenance"],
    },
    "papers": {
        "abstract": ["Abstract", "Summary", "Contribution"],
        "authors": ["Authors", "Authorship", "Who wrote it"],
        "publication": ["Publication", "Venue", "Publication details"],
    },
}


# --- rendering -----------------------------------------------------------------------------------

class Sent:
    """One sentence: text, entity spans (relative), relation pairs and stated facts."""

    __slots__ = ("text", "ents", "pairs", "facts")

    def __init__(self, text, ents, pairs, facts):
        self.text, self.ents, self.pairs, self.facts = text, ents, pairs, facts


def _join_list(names):
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def render(template, spec, facts, slots, ctx, shorten):
    """Fill ``template``; returns a Sent. ``shorten``: slot names rendered as a surname."""
    lists = {k: [f"{k}__{i}" for i in range(len(v))] for k, v in slots.items()
             if isinstance(v, list)}
    flat = {}
    for k, v in slots.items():
        if isinstance(v, list):
            for name, item in zip(lists[k], v, strict=True):
                flat[name] = item
        else:
            flat[k] = v
    tpl = re.sub(r"\{\*(\w+)\}",
                 lambda m: _join_list(["{" + n + "}" for n in lists[m.group(1)]]), template)
    parts, spans, pos, last = [], {}, 0, 0
    for m in re.finditer(r"\{(\w+)\}", tpl):
        lit = tpl[last:m.start()]
        parts.append(lit)
        pos += len(lit)
        value = flat[m.group(1)]
        if isinstance(value, Ent):
            text = value.surname() if m.group(1) in shorten else value.name
            if value.article and not _HAS_THE.search("".join(parts)):
                parts.append("the ")
                pos += 4
        else:
            text = str(value)
        assert m.group(1) not in spans, f"slot {m.group(1)} used twice in {template!r}"
        spans[m.group(1)] = (pos, pos + len(text), value, text)
        parts.append(text)
        pos += len(text)
        last = m.end()
    parts.append(tpl[last:])
    text = "".join(parts)
    text = text[0].upper() + text[1:]

    def expand(slot):
        return lists[slot[1:]] if slot.startswith("*") else [slot]

    ents = [(name, s, e, v, t) for name, (s, e, v, t) in spans.items() if isinstance(v, Ent)]
    ents.sort(key=lambda x: x[1])
    index = {x[0]: i for i, x in enumerate(ents)}
    declared, skipped = {}, set()
    for kind, a, b, label in spec:
        for x in expand(a):
            for y in expand(b):
                if x == y or x not in index or y not in index:
                    continue
                if kind == "skip":
                    skipped.add(frozenset((x, y)))
                elif label == "coauthored_with":  # symmetric: e1 is the first mention
                    first, second = sorted((x, y), key=lambda n: index[n])
                    declared[frozenset((x, y))] = (first, second, label)
                else:
                    declared[frozenset((x, y))] = (x, y, label)
    pairs = []
    for i in range(len(ents)):
        for j in range(i + 1, len(ents)):
            a, b = ents[i][0], ents[j][0]
            key = frozenset((a, b))
            assert ents[i][3].key != ents[j][3].key, f"same entity twice: {text}"
            if key in declared:
                x, y, label = declared[key]
                pairs.append((index[x], index[y], label))
            elif key not in skipped:
                pairs.append((i, j, "no_relation"))
    fact_out = []
    for kind, subj, ans in facts:
        if ans not in spans:  # this template does not state the fact
            continue
        if isinstance(subj, tuple):
            subjects = [tuple(flat[s].key for s in subj)]
        elif subj.startswith("@"):
            subjects = [(ctx[subj[1:]],)]
        else:
            subjects = [(flat[s].key,) for s in expand(subj)]
        s0, e0, value, atext = spans[ans]
        if isinstance(value, Ent):
            assert atext == value.name
        for sk in subjects:
            fact_out.append(((kind,) + sk, atext, s0, e0))
    ent_out = [{"slot": n, "start": s, "end": e, "text": t, "type": v.type, "key": v.key}
               for (n, s, e, v, t) in ents]
    return Sent(text, ent_out, pairs, fact_out)


class Doc:
    def __init__(self, category, key, title, rng, topic=None):
        self.category, self.id, self.title = category, f"{category}/{slug(title)}", title
        self.key = key
        self.rng, self.topic = rng, topic
        self.parts: list[tuple[str, list[Sent]]] = []
        self.used: set = set()
        self.sections: list[tuple[str, list[list[Sent]]]] = []

    def say(self, pool_name, ctx=None, **slots):
        p = POOLS[pool_name]
        choices = [i for i in range(len(p["tpls"])) if (pool_name, i) not in self.used]
        if not choices:
            choices = list(range(len(p["tpls"])))
        i = self.rng.choice(choices)
        self.used.add((pool_name, i))
        template, spec = p["tpls"][i]
        answers = {a for _, _, a in p["facts"]}
        shorten = set()
        for name, value in slots.items():
            if (isinstance(value, Ent) and value.key == self.topic and value.type == PERSON
                    and name not in answers and self.rng.random() < 0.4):
                shorten.add(name)
        return render(template, spec, p["facts"], slots, ctx or {}, shorten)

    def fill(self, kind, n, **params):
        out = []
        pool_ = FILLERS[kind]
        for _ in range(n):
            choices = [i for i in range(len(pool_)) if ("filler", kind, i) not in self.used]
            if not choices:
                break
            i = self.rng.choice(choices)
            self.used.add(("filler", kind, i))
            text = pool_[i].format(**params)
            out.append(Sent(text[0].upper() + text[1:], [], [], []))
        return out

    def add(self, role, sents, filler_kind=None, **params):
        sents = [s for s in sents if s is not None]
        if sents:
            self.parts.append((role, sents, filler_kind, params))

    def finish(self):
        """Pack parts into 2-5 sections of 2-6 sentences, pick headings, split paragraphs.

        Long parts are split, then the smallest adjacent parts merged until at most five
        remain; parts with a single sentence get a descriptive one from their filler pool.
        """
        parts = []
        for role, sents, kind, params in self.parts:
            while len(sents) > 6:
                parts.append([role, sents[:4], kind, params])
                sents = sents[4:]
            parts.append([role, sents, kind, params])
        while len(parts) > 5 or any(len(p[1]) < 2 and not p[2] for p in parts):
            best = None
            for i in range(len(parts) - 1):
                n = len(parts[i][1]) + len(parts[i + 1][1])
                if n <= 6 and (best is None or n < best[0]):
                    best = (n, i)
            assert best is not None, f"cannot pack {self.id}"
            i = best[1]
            first, second = parts[i], parts[i + 1]
            parts[i:i + 2] = [[first[0], first[1] + second[1], first[2] or second[2],
                               first[3] or second[3]]]
        taken = set()
        for role, sents, kind, params in parts:
            if len(sents) < 2:
                sents = sents + self.fill(kind, 2 - len(sents), **params)
            assert 2 <= len(sents) <= 6, (self.id, role, len(sents))
            options = [h for h in HEADINGS[self.category][role] if h not in taken]
            heading = self.rng.choice(options)
            taken.add(heading)
            n = len(sents)
            if n >= 4 and self.rng.random() < 0.6:
                k = self.rng.randint(2, n - 2)
                paras = [sents[:k], sents[k:]]
            else:
                paras = [sents]
            self.sections.append((heading, paras))
        assert 2 <= len(self.sections) <= 5, self.id


def chunks(items, rng, max_size=3):
    out, i = [], 0
    while i < len(items):
        k = rng.randint(1, max_size)
        out.append(items[i:i + k])
        i += k
    return out


# --- document builders ---------------------------------------------------------------------------

def pron(person):
    she = REC[person]["pron"] == "she"
    return {"Pr": "She" if she else "He", "pr": "she" if she else "he",
            "Pos": "Her" if she else "His", "pos": "her" if she else "his"}


def build_person(key, rng):
    r, E = REC[key], ENT
    d = Doc("people", key, r["name"], rng, topic=key)
    t1, t2 = rng.sample(KB.TOPICS, 2)
    params = dict(pron(key), t1=t1, t2=t2)
    p = E[key]
    ov = [d.say("intro_person", p=p, role=r["role"], t1=t1),
          d.say("hometown", p=p, c=E[r["hometown"]])]
    if rng.random() < 0.7:
        ov.append(d.say("background", p=p, bg=r["background"], Pr=params["Pr"]))
    ov += d.fill("person", rng.randint(0, 1), **params)
    d.add("overview", ov)

    lab = r["lab"]
    car = [d.say("works_at", p=p, o=E[lab], y=r["joined"], role=r["role"]),
           d.say("lab_loc_short", o=E[lab], c=E[city_of(lab)])]
    for founded in IX["labs_founded"][key]:
        founders = REC[founded]["founders"]
        if len(founders) == 1:
            car.append(d.say("founded_single", p=p, o=E[founded], y=REC[founded]["founded"]))
        else:
            other = [f for f in founders if f != key][0]
            car.append(d.say("founded_co", p=p, q=E[other], o=E[founded],
                             y=REC[founded]["founded"]))
    if rng.random() < 0.4:
        others = [lab_["key"] for lab_ in KB.LABS
                  if lab_["key"] != lab and lab_["key"] not in IX["labs_founded"][key]]
        car.append(d.say("person_visit", p=p, o=E[rng.choice(others)]))
    d.add("career", car, "person", **params)

    tr = []
    if r["advisor"]:
        tr.append(d.say("advised", p=p, a=E[r["advisor"]], y=r["phd"]))
    else:
        tr.append(d.say("phd_noadv", p=p, y=r["phd"]))
    for group in chunks(IX["students"][key], rng, 2):
        tr.append(d.say("supervised", a=p, q=[E[s] for s in group]))
    d.add("training", tr, "person", **params)

    res = []
    for m in IX["methods_by_dev"][key]:
        mr = REC[m]
        res.append(d.say("developed", p=p, m=E[m], y=mr["year"]))
        if mr["parent"]:
            res.append(d.say("extends", m=E[m], m2=E[mr["parent"]], how=mr["how"]))
    for i in IX["instruments_by_designer"][key]:
        res.append(d.say("instr_designed", p=p, i=E[i], y=REC[i]["year"]))
    d.add("research", res, "person", **params)

    col = []
    for group in chunks(IX["coauthors"][key], rng, 2):
        col.append(d.say("coauthor", p=p, q=[E[q] for q in group]))
    d.add("collab", col, "person", **params)

    ev = []
    for v in IX["venues_founded"][key]:
        ev.append(d.say("founded_venue", p=p, v=E[v], y=REC[v]["year"]))
    for kind, ed_key, m in IX["events"][key]:
        ed = EDITIONS[ed_key]
        v, y, c = E[ed["venue"]], ed["year"], E[ed["city"]]
        ctx = {"ed": ed_key}
        if kind == "keynote":
            ev.append(d.say("keynote_person", ctx, p=p, v=v, y=y, c=c))
        elif kind == "talk":
            ev.append(d.say("talk", ctx, p=p, m=E[m], v=v, y=y, c=c))
        elif kind == "award":
            ev.append(d.say("award", ctx, p=p, m=E[m], v=v, y=y))
        else:
            ev.append(d.say("chair", ctx, p=p, v=v, y=y, c=c))
    d.add("events", ev, "person", **params)
    return d


def build_lab(key, rng):
    r, E = REC[key], ENT
    d = Doc("labs", key, r["name"], rng)
    o, c = E[key], E[r["city"]]
    params = dict(t1=rng.choice(KB.TOPICS), t2=rng.choice(KB.TOPICS))
    d.add("overview", [d.say("lab_loc_country", o=o, c=c, k=E[country_of(r["city"])],
                             kind=r["kind"])] + d.fill("lab", rng.randint(1, 2), **params))
    founders = r["founders"]
    if len(founders) == 1:
        hist = [d.say("founded_single", p=E[founders[0]], o=o, y=r["founded"])]
    else:
        hist = [d.say("founded_co", p=E[founders[0]], q=E[founders[1]], o=o, y=r["founded"])]
    hist.append(d.say("staff_size", o=o, n=r["staff_size"]))
    d.add("history", hist, "lab", **params)
    ppl = [d.say("staff", o=o, p=[E[p] for p in g]) for g in chunks(IX["staff"][key], rng, 3)]
    if rng.random() < 0.5:
        other = rng.choice([x["key"] for x in KB.LABS if x["key"] != key])
        ppl.append(d.say("lab_visit", o=o, o2=E[other]))
    d.add("people", ppl, "lab", **params)
    fund = [d.say("funded_primary", o=o, f=E[r["funder"]])]
    if r["funder2"]:
        fund.append(d.say("funded_secondary", o=o, f=E[r["funder2"]]))
    d.add("funding", fund, "lab", **params)
    d.add("methods", [d.say("developed_at_lab", m=E[m], o=o, p=E[REC[m]["dev"]])
                      for m in IX["methods_by_lab"][key]], "lab", **params)
    d.add("data", [d.say("created_collected", o=o, d=E[ds], s=E[REC[ds]["site"]])
                   for ds in IX["datasets_by_lab"][key]], "lab", **params)
    return d


def build_method(key, rng):
    r, E = REC[key], ENT
    d = Doc("methods", key, r["name"], rng)
    m, dev = E[key], E[r["dev"]]
    summ = [d.say("task", m=m, task=r["task"]), d.say("developed", p=dev, m=m, y=r["year"])]
    d.add("summary", summ + d.fill("method", rng.randint(0, 1)), "method")
    orig = []
    if r["parent"]:
        orig.append(d.say("extends", m=m, m2=E[r["parent"]], how=r["how"]))
    orig.append(d.say("method_venue", m=m, v=E[r["venue"]], y=r["year"]))
    if rng.random() < 0.5:
        orig.append(d.say("dev_lab", p=dev, o=E[lab_of(r["dev"])]))
    d.add("origin", orig, "method")
    ev = [d.say("evaluated", m=m, d=[E[x] for x in g]) for g in chunks(r["evals"], rng, 2)]
    related = {r["parent"], *IX["children"][key]}
    options = [(ds, m2) for ds in r["evals"] for m2 in IX["evaluated_by"][ds]
               if m2 != key and m2 not in related]
    if options and rng.random() < 0.7:
        ds, m2 = rng.choice(options)
        ev.append(d.say("comparison", m=m, m2=E[m2], d=E[ds], x=rng.randint(4, 35)))
    for ds in KB.DATASETS:
        if ds["best"] == key:
            ev.append(d.say("best", d=E[ds["key"]], m=m))
    if rng.random() < 0.4:
        untested = [x["key"] for x in KB.DATASETS if x["key"] not in r["evals"]]
        ev.append(d.say("not_tested", m=m, d=E[rng.choice(untested)]))
    d.add("evaluation", ev, "method")
    later = [d.say("extends", m=E[c], m2=m, how=REC[c]["how"]) for c in IX["children"][key]]
    d.add("later", later, "method")
    tech = [d.say("window", m=m, w=f"{rng.choice([2, 4, 5, 8, 10, 15, 20, 30, 60])} seconds")]
    d.add("technique", tech + d.fill("method", rng.randint(1, 2)), "method")
    return d


def build_dataset(key, rng):
    r, E = REC[key], ENT
    d = Doc("datasets", key, r["name"], rng)
    ds = E[key]
    params = dict(ann=rng.choice(ANNOTATIONS), pct=rng.choice([10, 15, 20, 25]))
    ov = [d.say("hours", d=ds, h=f"{r['hours']} hours"),
          d.say("sample_rate", d=ds, k=f"{rng.choice([16, 24, 32, 48, 96, 192])} kHz")]
    d.add("overview", ov + d.fill("dataset", rng.randint(0, 1), **params), "dataset", **params)
    site = r["site"]
    coll = [d.say("collected", d=ds, s=E[site], y=r["year"]),
            d.say("created", d=ds, o=E[r["lab"]])]
    if site in {s["key"] for s in KB.SITES}:
        coll.append(d.say("site_loc", s=E[site], c=E[city_of(site)]))
    coll.append(d.say("instrument_used", d=ds, i=E[r["instrument"]]))
    d.add("collection", coll, "dataset", **params)
    bench = [d.say("evaluated_ds", d=ds, m=[E[x] for x in g])
             for g in chunks(IX["evaluated_by"][key], rng, 2)]
    bench.append(d.say("best", d=ds, m=E[r["best"]]))
    d.add("benchmarks", bench, "dataset", **params)
    d.add("access", d.fill("dataset", rng.randint(2, 3), **params), "dataset", **params)
    return d


def build_city(key, rng):
    r, E = REC[key], ENT
    d = Doc("cities", key, r["name"], rng)
    c = E[key]
    d.add("overview", [d.say("country", c=c, k=E[r["country"]]),
                       d.say("city_feature", c=c, ft=r["feature"])]
          + d.fill("city", rng.randint(0, 1)), "city")
    inst = [d.say("city_labs", c=c, o=[E[x] for x in IX["labs_by_city"][key]])]
    for f in IX["funders_by_city"][key]:
        inst.append(d.say("city_funder", c=c, f=E[f]))
    d.add("institutions", inst, "city")
    sites = [d.say("site_loc", s=E[s], c=c) for s in IX["sites_by_city"][key]]
    for ds in IX["datasets_by_site"][key]:
        sites.append(d.say("collected", d=E[ds], s=c, y=REC[ds]["year"]))
    d.add("sites", sites, "city")
    ev = [d.say("held_in", {"ed": ed}, v=E[EDITIONS[ed]["venue"]], c=c, y=EDITIONS[ed]["year"])
          for ed in IX["editions_by_city"][key]]
    d.add("events", ev, "city")
    return d


def build_site(key, rng):
    r, E = REC[key], ENT
    d = Doc("sites", key, r["name"], rng)
    s = E[key]
    d.add("overview", [d.say("site_loc_country", s=s, c=E[r["city"]],
                             k=E[country_of(r["city"])], kind=r["kind"])]
          + d.fill("site", 1), "site")
    rec = []
    for ds in IX["datasets_by_site"][key]:
        rec.append(d.say("collected", d=E[ds], s=s, y=REC[ds]["year"]))
        if rng.random() < 0.6:
            rec.append(d.say("instrument_used", d=E[ds], i=E[REC[ds]["instrument"]]))
    labs = sorted({REC[ds]["lab"] for ds in IX["datasets_by_site"][key]})
    if labs and rng.random() < 0.6:
        rec.append(d.say("site_visit", o=E[rng.choice(labs)], s=s))
    d.add("recordings", rec, "site")
    env = [d.say("tidal_range", s=s, r=f"{r['range']} metres"),
           d.say("seabed", s=s, sb=r["seabed"])]
    d.add("environment", env + d.fill("site", rng.randint(0, 1)), "site")
    return d


def build_country(key, rng):
    r, E = REC[key], ENT
    d = Doc("countries", key, r["name"], rng)
    k = E[key]
    d.add("overview", [d.say("country_intro", k=k, about=r["about"])] + d.fill("country", 1),
          "country")
    d.add("cities", [d.say("country_list", k=k, c=[E[c] for c in IX["cities_by_country"][key]])],
          "country")
    fund = [d.say("funder_loc_country", f=E[f["key"]], c=E[f["city"]], k=k)
            for f in KB.FUNDERS if country_of(f["city"]) == key]
    d.add("funding", fund, "country")
    return d


def build_edition(key, rng):
    ed, E = EDITIONS[key], ENT
    v, y, vr = E[ed["venue"]], ed["year"], REC[ed["venue"]]
    d = Doc("venues", key, f"{v.name} {y}", rng)
    ctx = {"ed": key}
    params = dict(k=rng.randint(6, 14), t1=rng.choice(KB.TOPICS))
    ov = [d.say("held_in", ctx, v=v, c=E[ed["city"]], y=y),
          d.say("founded_venue", p=E[vr["founder"]], v=v, y=vr["year"]),
          d.say("attendance", ctx, v=v, y=y, n=rng.randrange(80, 400, 10))]
    d.add("overview", ov, "venue", **params)
    prog = [d.say("keynote_aff", ctx, p=E[ed["keynote"]], o=E[lab_of(ed["keynote"])], v=v, y=y)]
    prog += [d.say("talk", ctx, p=E[p], m=E[m], v=v, y=y, c=E[ed["city"]])
             for p, m in ed["talks"]]
    d.add("programme", prog + d.fill("venue", rng.randint(0, 1), **params), "venue", **params)
    aw = [d.say("award", ctx, p=E[ed["award"][0]], m=E[ed["award"][1]], v=v, y=y)]
    d.add("awards", aw + d.fill("venue", 1, **params), "venue", **params)
    org = [d.say("chair", ctx, p=E[ed["chair"]], v=v, y=y, c=E[ed["city"]]),
           d.say("sponsored", ctx, v=v, f=E[vr["sponsor"]], y=y)]
    d.add("organisation", org + d.fill("venue", rng.randint(0, 1), **params), "venue",
          **params)
    return d


def build_funder(key, rng):
    r, E = REC[key], ENT
    d = Doc("funders", key, r["name"], rng)
    f = E[key]
    d.add("overview", [d.say("funder_loc", f=f, c=E[r["city"]]),
                       d.say("funder_year", f=f, y=r["year"]),
                       d.say("funder_kind", f=f, kind=r["kind"])], "funder")
    gr = [d.say("grantees", f=f, o=[E[x] for x in g]) for g in chunks(IX["grantees"][key], rng, 2)]
    gr += [d.say("funded_secondary", o=E[x], f=f) for x in IX["grantees2"][key]]
    gr += [d.say("sponsor_series", f=f, v=E[v["key"]]) for v in KB.VENUES
           if v["sponsor"] == key]
    d.add("grants", gr, "funder")
    d.add("policy", d.fill("funder", rng.randint(2, 3)), "funder")
    return d


def build_instrument(key, rng):
    r, E = REC[key], ENT
    d = Doc("instruments", key, r["name"], rng)
    i = E[key]
    params = dict(wk=rng.choice([3, 4, 6, 8, 10, 12]))
    d.add("overview", [d.say("instr_designed", p=E[r["designer"]], i=i, y=r["year"]),
                       d.say("instr_lab", i=i, o=E[lab_of(r["designer"])]),
                       d.say("instr_kind", i=i, kind=r["kind"])], "instrument", **params)
    dep = [d.say("instrument_datasets", i=i, d=[E[x] for x in g])
           for g in chunks(IX["datasets_by_instrument"][key], rng, 2)]
    d.add("deployments", dep, "instrument", **params)
    spec = [d.say("instr_weight", i=i, wt=f"{r['weight']} kilograms"),
            d.say("instr_depth", i=i, dp=f"{r['depth']} metres")]
    d.add("specs", spec + d.fill("instrument", rng.randint(0, 2), **params), "instrument",
          **params)
    return d


def build_paper(key, rng):
    r, E = PAPERS[key], ENT
    d = Doc("papers", key, r["title"], rng)
    ctx = {"paper": key}
    params = dict(t1=rng.choice(KB.TOPICS))
    d.add("abstract", [d.say("paper_applies", ctx, m=E[r["method"]], d=E[r["dataset"]])]
          + d.fill("paper", rng.randint(1, 2), **params), "paper", **params)
    first = r["authors"][0]
    d.add("authors", [d.say("paper_authors", p=[E[a] for a in r["authors"]]),
                      d.say("first_author", ctx, p=E[first]),
                      d.say("paper_aff", p=E[first], o=E[lab_of(first)])], "paper")
    d.add("publication", [d.say("paper_venue", ctx, v=E[r["venue"]], y=r["year"])]
          + d.fill("paper", 1, **params), "paper", **params)
    return d


def build_documents(rng):
    docs = []
    docs += [build_person(p["key"], rng) for p in KB.PEOPLE]
    docs += [build_lab(x["key"], rng) for x in KB.LABS]
    docs += [build_method(x["key"], rng) for x in KB.METHODS]
    docs += [build_dataset(x["key"], rng) for x in KB.DATASETS]
    docs += [build_city(x["key"], rng) for x in KB.CITIES]
    docs += [build_site(x["key"], rng) for x in KB.SITES]
    docs += [build_country(x["key"], rng) for x in KB.COUNTRIES]
    docs += [build_edition(k, rng) for k in EDITIONS]
    docs += [build_funder(x["key"], rng) for x in KB.FUNDERS]
    docs += [build_instrument(x["key"], rng) for x in KB.INSTRUMENTS]
    docs += [build_paper(k, rng) for k in PAPERS]
    ids = [d.id for d in docs]
    assert len(set(ids)) == len(ids), "duplicate document ids"
    for d in docs:
        d.finish()
    return docs


# --- gold -----------------------------------------------------------------------------------------

QUESTION_TEMPLATES = {
    "lab": ["Which research group does {s} currently work for?",
            "At which lab is {s} employed?", "What organisation is {s} affiliated with?",
            "Which institution employs {s}?"],
    "join_year": ["In which year did {s} start at {lab}?", "When did {s} join {lab}?",
                  "Since what year has {s} been with {lab}?"],
    "hometown": ["In which city did {s} grow up?", "What is the home town of {s}?",
                 "Where does {s} come from originally?"],
    "background": ["What did {s} train as before working in tidal acoustics?",
                   "What was the earlier profession of {s}?"],
    "advisor": ["Who supervised the doctorate of {s}?", "Who was the doctoral advisor of {s}?",
                "Under whose supervision did {s} earn a doctorate?"],
    "phd_year": ["In what year did {s} finish a doctorate?",
                 "When did {s} complete doctoral studies?",
                 "Which year did {s} obtain a doctoral degree?"],
    "developer": ["Who created {s}?", "Which researcher is credited with {s}?",
                  "Who is the original author of the {s} method?"],
    "method_year": ["When was {s} first introduced?", "In what year did {s} appear?",
                    "What year was {s} proposed?"],
    "parent": ["Which earlier method does {s} build on?",
               "What technique is {s} an extension of?",
               "{s} was derived from which older method?"],
    "method_venue": ["At which meeting was {s} first presented?",
                     "Where was {s} originally presented to the community?"],
    "task": ["What is {s} used for?", "What problem does {s} address?"],
    "window": ["How long are the analysis windows of {s}?",
               "What window length does {s} use?"],
    "lab_city": ["In which city is {s} located?", "Where is {s} based?",
                 "Which city is home to {s}?"],
    "founder": ["Who established {s}?", "Who is the founder of {s}?",
                "Which researcher set up {s}?"],
    "cofounder": ["Who co-founded {o} together with {p}?",
                  "Besides {p}, who else founded {o}?"],
    "founded_year": ["When was {s} established?", "In which year was {s} founded?",
                     "How old is {s}, that is, in what year did it start?"],
    "staff_size": ["How many people work at {s}?", "What is the size of the staff of {s}?"],
    "funder": ["Which agency provides the main funding for {s}?",
               "Who is the principal funder of {s}?", "Where does {s} get most of its money?"],
    "venue_founder": ["Who started the {s} series?", "Who founded the {s}?"],
    "venue_year": ["In what year was the {s} series founded?",
                   "When did the {s} begin?"],
    "site": ["Where were the recordings of {s} made?", "At which location was {s} collected?",
             "Which site did {s} come from?"],
    "collect_year": ["When was {s} recorded?", "In what year were the recordings of {s} made?"],
    "creator": ["Which lab assembled {s}?", "Which group produced {s}?",
                "Who compiled the {s}?"],
    "instrument": ["Which device was used to capture {s}?",
                   "What instrument recorded {s}?", "Which recorder was used for {s}?"],
    "hours": ["How much audio does {s} contain?", "How many hours of recordings are in {s}?"],
    "sample_rate": ["At what sampling rate was {s} recorded?",
                    "What is the sample rate of the audio in {s}?"],
    "best": ["Which method holds the best reported result on {s}?",
             "What is the top-performing method on {s}?"],
    "country": ["Which country is {s} in?", "In what country is the city of {s}?"],
    "feature": ["What is {s} known for?", "What is the city of {s} famous for?"],
    "site_city": ["Which city is closest to {s}?", "Near which city does {s} lie?"],
    "tidal_range": ["How large is the tidal range at {s}?",
                    "By how much does the water level change at {s}?"],
    "seabed": ["What is the seabed like at {s}?", "What is the bottom of {s} made of?"],
    "edition_city": ["Where was the {y} {v} held?", "Which city hosted {v} in {y}?",
                     "In which city did the {y} edition of {v} take place?"],
    "keynote": ["Who gave the keynote at the {y} {v}?",
                "Who was the keynote speaker of {v} in {y}?"],
    "chair": ["Who chaired the programme committee of {v} {y}?",
              "Who was programme chair at the {y} {v}?"],
    "sponsor": ["Which funder sponsored the {y} {v}?",
                "Who paid for most of the {y} edition of {v}?"],
    "award": ["Who won the best paper award at {v} {y}?",
              "Who received the best paper prize at the {y} {v}?"],
    "attendance": ["How many participants attended {v} in {y}?",
                   "How large was the {y} {v} in terms of attendance?"],
    "funder_city": ["Where is {s} headquartered?", "In which city is the head office of {s}?"],
    "funder_year": ["When was {s} set up?", "In what year was {s} established?"],
    "designer": ["Who designed {s}?", "Which engineer or scientist designed the {s}?"],
    "instrument_year": ["When was {s} designed?", "In what year was the {s} first built?"],
    "instrument_lab": ["Where is {s} built?", "Which lab manufactures {s}?"],
    "weight": ["How heavy is {s}?", "What does {s} weigh in air?"],
    "depth_rating": ["How deep can {s} operate?", "To what depth is {s} rated?"],
    "paper_dataset": ["Which dataset is used in the paper '{t}'?",
                      "On what data are the experiments of '{t}' run?"],
    "first_author": ["Who is the first author of '{t}'?", "Who led the paper '{t}'?"],
    "paper_venue": ["At which venue did the paper '{t}' appear?",
                    "Where was '{t}' presented?"],
    "paper_year": ["In what year was '{t}' published?", "When did '{t}' appear?"],
}


def question_text(fact_key, rng):
    kind, subj = fact_key[0], fact_key[1:]
    tpl = rng.choice(QUESTION_TEMPLATES[kind])
    if kind == "cofounder":
        fields = {"o": ENT[subj[0]], "p": ENT[subj[1]]}
    elif subj[0] in EDITIONS:
        ed = EDITIONS[subj[0]]
        fields = {"v": ENT[ed["venue"]], "y": ed["year"]}
    elif subj[0] in PAPERS:
        fields = {"t": PAPERS[subj[0]]["title"]}
    else:
        fields = {"s": ENT[subj[0]]}
        if kind == "join_year":
            fields["lab"] = ENT[lab_of(subj[0])]
    out, last = [], 0
    for m in re.finditer(r"\{(\w+)\}", tpl):
        out.append(tpl[last:m.start()])
        value = fields[m.group(1)]
        if isinstance(value, Ent):
            if value.article and not _HAS_THE.search("".join(out)):
                out.append("the ")
            value = value.name
        out.append(str(value))
        last = m.end()
    out.append(tpl[last:])
    text = "".join(out)
    return text[0].upper() + text[1:]


def assemble(docs):
    """Section texts, relation mentions and fact statements with section offsets."""
    relations, statements = [], defaultdict(list)
    for doc in docs:
        doc.texts = []
        for heading, paras in doc.sections:
            pieces, pos, located = [], 0, []
            for pi, para in enumerate(paras):
                if pi:
                    pieces.append("\n\n")
                    pos += 2
                for si, sent in enumerate(para):
                    if si:
                        pieces.append(" ")
                        pos += 1
                    located.append((pos, sent))
                    pieces.append(sent.text)
                    pos += len(sent.text)
            text = "".join(pieces)
            doc.texts.append((heading, text))
            for off, sent in located:
                span = (off, off + len(sent.text))
                for i, j, label in sent.pairs:
                    e1, e2 = sent.ents[i], sent.ents[j]
                    relations.append({
                        "doc_id": doc.id, "section": heading,
                        "sentence": {"start": span[0], "end": span[1]},
                        "e1": {"text": e1["text"], "type": e1["type"],
                               "start": off + e1["start"], "end": off + e1["end"]},
                        "e2": {"text": e2["text"], "type": e2["type"],
                               "start": off + e2["start"], "end": off + e2["end"]},
                        "label": label})
                for key, answer, _s, _e in sent.facts:
                    statements[key].append((doc.id, heading, span[0], span[1], answer,
                                            sent.text))
    for i, r in enumerate(relations, start=1):
        r["id"] = f"r{i:04d}"
    relations = [{"id": r["id"], **{k: v for k, v in r.items() if k != "id"}} for r in relations]
    return relations, statements


def make_questions(statements, docs, rng):
    doc_order = {d.id: i for i, d in enumerate(docs)}
    candidates = []
    for key in statements:  # insertion order: deterministic
        stmts = statements[key]
        answers = {s[4] for s in stmts}
        assert len(answers) == 1, f"inconsistent answers for {key}: {answers}"
        answer = stmts[0][4]
        seen, relevant = set(), []
        for doc_id, heading, start, end, _a, sentence in stmts:
            if answer in sentence and (doc_id, heading, start) not in seen:
                seen.add((doc_id, heading, start))
                relevant.append({"doc_id": doc_id, "section": heading, "start": start,
                                 "end": end})
        if relevant:
            candidates.append((key, answer, relevant))
    rng.shuffle(candidates)

    parent: dict[str, str] = {}
    size: dict[str, int] = {}

    def find(x):
        parent.setdefault(x, x)
        size.setdefault(x, 1)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    chosen, covered = [], set()
    multi = [c for c in candidates if len({r["doc_id"] for r in c[2]}) > 1]
    single = [c for c in candidates if len({r["doc_id"] for r in c[2]}) == 1]
    for c in multi:  # multi-document questions, keeping linked document groups small
        roots = {find(r["doc_id"]) for r in c[2]}
        if sum(size[x] for x in roots) > MAX_GROUP_DOCS:
            continue
        roots = sorted(roots)
        for x in roots[1:]:
            parent[x] = roots[0]
            size[roots[0]] += size[x]
        chosen.append(c)
        covered.update(r["doc_id"] for r in c[2])
    rest = []
    for c in single:  # then cover as many documents as possible
        if c[2][0]["doc_id"] not in covered:
            chosen.append(c)
            covered.add(c[2][0]["doc_id"])
        else:
            rest.append(c)
    need = max(0, N_QUESTIONS - len(chosen))
    chosen += rest[:need]
    chosen.sort(key=lambda c: (doc_order[c[2][0]["doc_id"]], c[2][0]["section"],
                               c[2][0]["start"], c[0]))
    questions = []
    for i, (key, answer, relevant) in enumerate(chosen, start=1):
        questions.append({"id": f"q{i:04d}", "question": question_text(key, rng),
                          "answer": answer, "relevant": relevant})
    return questions


# --- writing -----------------------------------------------------------------------------------

def _dump_json(obj, **kw):
    return json.dumps(obj, ensure_ascii=True, **kw)


def write_corpus(out: Path, docs, questions, relations):
    for sub in ("documents", "gold"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    droot = out / "documents"
    droot.mkdir(parents=True)
    (out / "gold").mkdir(parents=True)
    formats = {}
    for i, doc in enumerate(docs):
        formats[doc.id] = FORMATS[i % len(FORMATS)]
    bundles = defaultdict(list)
    for doc in docs:
        fmt = formats[doc.id]
        obj = {"id": doc.id, "title": doc.title,
               "sections": [{"heading": h, "text": t} for h, t in doc.texts]}
        if fmt == "jsonl":
            bundles[doc.category].append(obj)
            continue
        path = droot / f"{doc.id}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "md":
            lines = [f"# {doc.title}", ""]
            for h, t in doc.texts:
                lines += [f"## {h}", "", t, ""]
            content = "\n".join(lines)
        elif fmt == "txt":
            lines = [doc.title, ""]
            for h, t in doc.texts:
                lines += [f"== {h} ==", "", t, ""]
            content = "\n".join(lines)
        else:
            content = _dump_json(obj, indent=2) + "\n"
        path.write_text(content, encoding="utf-8", newline="\n")
    (droot / "collections").mkdir()
    for cat in sorted(bundles):
        lines = [_dump_json(o) for o in bundles[cat]]
        (droot / "collections" / f"{cat}.jsonl").write_text("\n".join(lines) + "\n",
                                                             encoding="utf-8", newline="\n")
    for name, rows in (("questions.jsonl", questions), ("relations.jsonl", relations)):
        (out / "gold" / name).write_text("".join(_dump_json(r) + "\n" for r in rows),
                                         encoding="utf-8", newline="\n")
    return formats


RELATION_DOC = [
    ("works_at", "PERSON -> ORG (a lab)",
     "Mateo Ferrandiz joined the Northreach Tidal Computing Lab in 2012"),
    ("founded", "PERSON -> ORG (a lab) or VENUE (a conference series)",
     "Edda Marrowby founded the Halvard Institute for Tidal Acoustics in 1979"),
    ("developed", "PERSON -> METHOD or INSTRUMENT",
     "In 2010, Jasper Quillon introduced Neap Cycle Attention Network"),
    ("evaluated_on", "METHOD -> DATASET",
     "Multi-Bore Tracking was tested on the Oldwater Strait Bore Archive"),
    ("collected_at", "DATASET -> LOCATION (field site or city)",
     "The Korrin Neap Cycle Benchmark was recorded at Korrin Estuary in 2009"),
    ("recorded_with", "DATASET -> INSTRUMENT",
     "The Ivel Narrows Glider Survey was captured using the Gullwing Acoustic Glider"),
    ("advised_by", "PERSON (doctoral student) -> PERSON (advisor)",
     "Olwen Tregarth was advised by Nadia Osterholm"),
    ("located_in", "ORG or LOCATION -> LOCATION (lab or funder in a city, site near a city, "
     "city in a country)", "The Oszell Coastal Observatory is based in Oszell"),
    ("funded_by", "ORG (a lab) or VENUE (sponsorship) -> ORG (a funder)",
     "The Kestrel Sound Ecology Group is funded chiefly by the Aldmoor Trust"),
    ("extends", "METHOD -> METHOD (the earlier method it builds on)",
     "Sparse Lattice Inversion extends Reverb Lattice Inversion by ..."),
    ("coauthored_with", "PERSON <-> PERSON (symmetric; e1 is the first mention)",
     "Bram Oudekerk has published jointly with Saoirse Mallaghan"),
    ("presented_at", "PERSON or METHOD -> VENUE",
     "Mirela Kovanek gave a talk on Tidal Graph Propagation at the Workshop on Estuarine "
     "Signal Processing in 2018 (both the person and the method)"),
    ("held_in", "VENUE -> LOCATION (host city of an edition)",
     "The Coastal Listening Forum met in Sellick Bay in 2013"),
    ("no_relation", "two entities in one sentence that states none of the relations above",
     "colleagues listed together (not co-authors), a person and the city they grew up in, a "
     "programme chair and the conference (chairing is not presenting), a research visit (not "
     "employment), a method not tested on a dataset, two datasets or methods in one list"),
]


def write_readme(out: Path, docs, formats, questions, relations):
    fmt_counts = Counter(formats.values())
    cat_counts = Counter(d.category for d in docs)
    label_counts = Counter(r["label"] for r in relations)
    type_counts = Counter()
    for r in relations:
        type_counts[r["e1"]["type"]] += 1
        type_counts[r["e2"]["type"]] += 1
    multi = sum(len({x["doc_id"] for x in q["relevant"]}) > 1 for q in questions)
    q_docs = len({x["doc_id"] for q in questions for x in q["relevant"]})
    n_sections = sum(len(d.texts) for d in docs)
    lines = [
        "# Embedded default corpus",
        "",
        "A small, fully synthetic corpus used as the default input of the build (`paths.documents`",
        "and `paths.gold`). It is generated by `scripts/make_corpus.py` from the hand-written",
        "knowledge base in `scripts/corpus_kb.py`; do not edit the files by hand. Regenerate with:",
        "",
        "```",
        "python scripts/make_corpus.py            # writes data/documents, data/gold, this README",
        "python scripts/make_corpus.py --check-determinism   # generate twice and compare bytes",
        "```",
        "",
        f"Generation is deterministic (stdlib only, `random.Random({SEED})`, no network): running "
        "it twice",
        "gives byte-identical files. The script deletes and recreates only `documents/` and",
        "`gold/` (and rewrites this README), then re-reads everything with independent parsers",
        "and checks counts and offsets (`verify`).",
        "",
        "## Domain",
        "",
        *textwrap.wrap(
            f"All text is original and describes one **fictional** research field, "
            f"*{KB.FIELD}*: the study of how sound travels through tidal estuaries, channels and "
            f"harbours, recorded with hydrophones. The knowledge base holds {len(KB.PEOPLE)} "
            f"people, {len(KB.LABS)} labs, {len(KB.FUNDERS)} funding agencies, {len(KB.VENUES)} "
            f"conference series ({len(EDITIONS)} editions), {len(KB.COUNTRIES)} countries, "
            f"{len(KB.CITIES)} cities, {len(KB.SITES)} field sites, {len(KB.INSTRUMENTS)} "
            f"instruments, {len(KB.METHODS)} methods, {len(KB.DATASETS)} datasets and "
            f"{len(KB.PAPERS)} papers, linked by facts: who works where, who founded which lab or "
            "conference, who advised whom, who developed which method or instrument, which "
            "method extends which, which method was evaluated on which dataset, where and with "
            "what each dataset was recorded, where labs, funders and sites are, which funder "
            "supports which lab or conference, who co-authored with whom, who presented at or "
            "chaired which conference edition, and so on. People, places and organisations are "
            "invented.", 92),
        "",
        "Each document is about one entity, with 2-5 sections of 2-6 sentences. Sentences are",
        "rendered from several templates per fact type, so the same fact is phrased differently",
        "across documents, and many facts are stated in more than one document.",
        "",
        "| category | documents | id prefix |",
        "|---|---|---|",
    ]
    for cat in sorted(cat_counts):
        lines.append(f"| {cat} | {cat_counts[cat]} | `{cat}/` |")
    lines += [
        "",
        "## Documents (`documents/`)",
        "",
        f"{len(docs)} documents, {n_sections} sections. The document id is the path relative to "
        "`documents/` without",
        "extension (`/` separators), e.g. `people/maren-tolvik`; JSON and JSON Lines documents",
        "carry the same kind of id in their `id` field. Formats (documents per format):",
        "",
        "| format | documents | layout |",
        "|---|---|---|",
        f"| Markdown `.md` | {fmt_counts['md']} | `# Title`, blank line, then per section "
        "`## Heading`, blank line, paragraphs separated by one blank line |",
        f"| plain text `.txt` | {fmt_counts['txt']} | first line is the title, blank line, then "
        "per section `== Heading ==`, blank line, paragraphs separated by one blank line |",
        f"| JSON `.json` | {fmt_counts['json']} | one object "
        '`{"id", "title", "sections": [{"heading", "text"}]}` per file |',
        f"| JSON Lines `.jsonl` | {fmt_counts['jsonl']} | `collections/<category>.jsonl`, one "
        "such object per line |",
        "",
        "Text rules: ASCII only; a section's text is its paragraphs joined by exactly `\\n\\n`;",
        "each paragraph is one line with single spaces and no leading or trailing space. In `.md`",
        "and `.txt` files the section text is exactly the lines between a heading and the next",
        "heading (or the end of the file) without the surrounding blank lines. Headings are unique",
        "within a document and every section is non-empty. Sentences end with `.` followed by",
        "a space and an upper-case letter or digit (or the end of the paragraph) and contain no",
        "other sentence-final punctuation, so `sphana.documents.split_sentences` recovers them",
        "exactly.",
        "",
        "## Gold annotations (`gold/`)",
        "",
        "All offsets are character offsets into the **section text** as defined above (the",
        "normalized text that `ingest` produces), `start` inclusive and `end` exclusive.",
        "",
        f"### `questions.jsonl` ({len(questions)} questions)",
        "",
        "```",
        '{"id": "q0001", "question": "...", "answer": "...", '
        '"relevant": [{"doc_id": "...", "section": "...", "start": 0, "end": 57}]}',
        "```",
        "",
        "- `answer`: a short string that occurs verbatim in every relevant passage.",
        "- `relevant`: every sentence of the corpus that states the asked fact (and contains the",
        f"  answer): `section_text[start:end]` is exactly that sentence. {multi} questions have",
        "  passages in two or more documents; documents linked that way form groups of at most",
        f"  {MAX_GROUP_DOCS} documents (the dataset split keeps such groups together).",
        f"- Questions paraphrase the evidence and cover {q_docs} distinct documents.",
        "",
        f"### `relations.jsonl` ({len(relations)} entity-pair mentions)",
        "",
        "```",
        '{"id": "r0001", "doc_id": "...", "section": "...", "sentence": {"start": 0, "end": 60}, '
        '"e1": {"text": "...", "type": "PERSON", "start": 0, "end": 13}, '
        '"e2": {"text": "...", "type": "ORG", "start": 21, "end": 50}, "label": "works_at"}',
        "```",
        "",
        "- `sentence`, `e1` and `e2` offsets all index the section text (not the sentence);",
        "  `section_text[e.start:e.end] == e.text`, both entities lie inside the sentence span and",
        "  do not overlap.",
        "- Every pair of entity mentions in a sentence is listed once, except pairs whose relation",
        "  is implied but not stated (e.g. a lab and the country of its city), which are left out.",
        "- Direction matters: `e1` is the subject (`PERSON works_at ORG`). For the symmetric",
        "  `coauthored_with` and for `no_relation`, `e1` is the first mention in the sentence.",
        "- Entity types: PERSON, ORG (labs and funding agencies), LOCATION (countries, cities,",
        "  field sites), METHOD, DATASET, VENUE (conference series), INSTRUMENT. Years appear in",
        "  the text but are not annotated as entities.",
        "",
        "| label | signature | mentions | example |",
        "|---|---|---|---|",
    ]
    for label, sig, example in RELATION_DOC:
        lines.append(f"| `{label}` | {sig} | {label_counts[label]} | {example} |")
    lines += [
        "",
        "Entity mentions by type (e1 and e2 together): "
        + ", ".join(f"{t} {n}" for t, n in sorted(type_counts.items())) + ".",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8", newline="\n")


def generate(out: Path):
    rng = random.Random(SEED)
    docs = build_documents(rng)
    relations, statements = assemble(docs)
    questions = make_questions(statements, docs, rng)
    formats = write_corpus(out, docs, questions, relations)
    write_readme(out, docs, formats, questions, relations)
    return out


# --- verification (independent re-reading of the written files) ----------------------------------


def _sections_from_lines(lines, is_heading, heading_text, where):
    sections, cur = [], None
    for line in lines:
        if is_heading(line):
            cur = [heading_text(line), []]
            sections.append(cur)
        else:
            assert cur is not None or not line.strip(), f"{where}: text before first heading"
            if cur is not None:
                cur[1].append(line)
    out = []
    for heading, body in sections:
        while body and body[0] == "":
            body.pop(0)
        while body and body[-1] == "":
            body.pop()
        out.append((heading, "\n".join(body)))
    return out


def _read_docs(root: Path):
    docs, by_format = {}, Counter()

    def add(doc_id, title, sections, where, fmt):
        assert doc_id not in docs, f"duplicate document id {doc_id} ({where})"
        docs[doc_id] = (title, sections)
        by_format[fmt] += 1

    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        ext = path.suffix[1:]
        raw = path.read_bytes()
        assert raw.isascii(), f"{rel}: non-ASCII bytes"
        text = raw.decode("ascii")
        assert "\r" not in text and "\t" not in text, rel
        doc_id = rel[: -len(path.suffix)]
        if ext == "md":
            lines = text.split("\n")
            assert lines[0].startswith("# ") and lines[1] == "" and lines[-1] == "", rel
            secs = _sections_from_lines(lines[2:], lambda x: x.startswith("## "), lambda x: x[3:],
                                        rel)
            add(doc_id, lines[0][2:], secs, rel, "md")
        elif ext == "txt":
            lines = text.split("\n")
            assert lines[1] == "" and lines[-1] == "", rel

            def is_h(x):
                return x.startswith("== ") and x.endswith(" ==")
            assert not is_h(lines[0]), rel
            secs = _sections_from_lines(lines[2:], is_h, lambda x: x[3:-3], rel)
            add(doc_id, lines[0], secs, rel, "txt")
        elif ext == "json":
            obj = json.loads(text)
            assert obj["id"] == doc_id, f"{rel}: id {obj['id']} != path"
            add(obj["id"], obj["title"], [(s["heading"], s["text"]) for s in obj["sections"]],
                rel, "json")
        elif ext == "jsonl":
            for n, line in enumerate(text.split("\n")[:-1], start=1):
                obj = json.loads(line)
                add(obj["id"], obj["title"], [(s["heading"], s["text"]) for s in obj["sections"]],
                    f"{rel}:{n}", "jsonl")
        else:
            raise AssertionError(f"unexpected file {rel}")
    return docs, by_format


def verify(out_dir: Path, quiet=False):
    out_dir = Path(out_dir)
    docs, by_format = _read_docs(out_dir / "documents")
    n_sent = 0
    for doc_id, (title, sections) in docs.items():
        assert title and title == title.strip() and "\n" not in title, doc_id
        assert 2 <= len(sections) <= 5, (doc_id, len(sections))
        headings = [h for h, _ in sections]
        assert len(set(headings)) == len(headings), f"{doc_id}: duplicate headings"
        for h, t in sections:
            assert h and h == h.strip() and "\n" not in h, (doc_id, h)
            assert t, (doc_id, h)
            paras = t.split("\n\n")
            for p in paras:
                assert p and p == p.strip() and "\n" not in p and "  " not in p, (doc_id, h, p)
                assert not p.startswith("#") and not p.startswith("=="), (doc_id, p)
            sents = [t[s:e] for s, e in split_sentences(t)]
            assert 2 <= len(sents) <= 6, (doc_id, h, len(sents))
            assert all(s.endswith(".") for s in sents), (doc_id, h)
            n_sent += len(sents)

    def section_text(doc_id, heading):
        assert doc_id in docs, f"unknown document {doc_id}"
        found = [t for h, t in docs[doc_id][1] if h == heading]
        assert len(found) == 1, (doc_id, heading)
        return found[0]

    def sentence_ok(text, start, end):
        return (start, end) in set(split_sentences(text))

    questions = [json.loads(x) for x in (out_dir / "gold" / "questions.jsonl").read_text()
                 .splitlines()]
    ids = [q["id"] for q in questions]
    assert len(set(ids)) == len(ids), "duplicate question ids"
    q_docs, multi = set(), 0
    for q in questions:
        assert set(q) == {"id", "question", "answer", "relevant"}, q["id"]
        assert q["question"].endswith("?") and q["answer"] and q["relevant"], q["id"]
        docs_here = set()
        for r in q["relevant"]:
            assert set(r) == {"doc_id", "section", "start", "end"}, q["id"]
            text = section_text(r["doc_id"], r["section"])
            assert 0 <= r["start"] < r["end"] <= len(text), q["id"]
            assert sentence_ok(text, r["start"], r["end"]), f"{q['id']}: not a sentence span"
            assert q["answer"] in text[r["start"]:r["end"]], f"{q['id']}: answer not in evidence"
            assert q["question"].lower() != text[r["start"]:r["end"]].lower()
            docs_here.add(r["doc_id"])
        q_docs |= docs_here
        multi += len(docs_here) > 1

    relations = [json.loads(x) for x in (out_dir / "gold" / "relations.jsonl").read_text()
                 .splitlines()]
    rids = [r["id"] for r in relations]
    assert len(set(rids)) == len(rids), "duplicate relation ids"
    labels = Counter()
    for r in relations:
        assert set(r) == {"id", "doc_id", "section", "sentence", "e1", "e2", "label"}, r["id"]
        text = section_text(r["doc_id"], r["section"])
        s, e = r["sentence"]["start"], r["sentence"]["end"]
        assert sentence_ok(text, s, e), f"{r['id']}: not a sentence span"
        for ent in (r["e1"], r["e2"]):
            assert text[ent["start"]:ent["end"]] == ent["text"], r["id"]
            assert s <= ent["start"] < ent["end"] <= e, r["id"]
            assert ent["type"] in {PERSON, ORG, LOCATION, METHOD, DATASET, VENUE, INSTRUMENT}
        a, b = r["e1"], r["e2"]
        assert a["end"] <= b["start"] or b["end"] <= a["start"], f"{r['id']}: overlap"
        labels[r["label"]] += 1

    n_docs = len(docs)
    no_rel = labels["no_relation"] / max(1, len(relations))
    types = {k: v for k, v in labels.items() if k != "no_relation"}
    checks = [
        (n_docs >= 150, f"documents {n_docs} >= 150"),
        (all(by_format[f] >= 30 for f in FORMATS), f"each format >= 30: {dict(by_format)}"),
        (len(questions) >= 300, f"questions {len(questions)} >= 300"),
        (len(q_docs) >= 120, f"documents with a relevant passage {len(q_docs)} >= 120"),
        (multi >= 30, f"multi-document questions {multi} >= 30"),
        (len(relations) >= 600, f"relation mentions {len(relations)} >= 600"),
        (len(types) >= 8 and min(types.values()) >= 40,
         f"relation types {len(types)} >= 8 with >= 40 each (min {min(types.values())})"),
        (no_rel >= 0.15, f"no_relation share {no_rel:.1%} >= 15%"),
    ]
    for ok, what in checks:
        assert ok, f"check failed: {what}"
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    assert size < 3_000_000, f"data too large: {size} bytes"
    if not quiet:
        print(f"verified {out_dir}: {n_docs} documents {dict(sorted(by_format.items()))}, "
              f"{n_sent} sentences, {size / 1e6:.2f} MB")
        print(f"  questions: {len(questions)} ({multi} multi-document, {len(q_docs)} documents)")
        print(f"  relation mentions: {len(relations)} "
              f"(no_relation {no_rel:.1%}): {dict(sorted(labels.items()))}")
    return {"documents": n_docs, "by_format": dict(by_format), "questions": len(questions),
            "relations": dict(labels)}


def _same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "data",
                    help="output folder (default: data/ at the repository root)")
    ap.add_argument("--check-determinism", action="store_true",
                    help="also generate twice into temporary folders and compare the bytes")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    generate(out)
    verify(out)
    if args.check_determinism:
        with tempfile.TemporaryDirectory() as tmp:
            a, b = Path(tmp) / "a", Path(tmp) / "b"
            generate(a)
            generate(b)
            assert _same_tree(a, b), "two runs differ"
            assert _same_tree(a, out), "output differs from a fresh run"
        print("deterministic: two fresh runs and the output are byte-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
