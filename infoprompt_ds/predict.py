"""Predict labels for new texts with an export (soft prompt + head) on top of its frozen backbone.

    python -m infoprompt_ds.predict --export outputs/run/best --text "a gripping, funny film"
    infoprompt-predict --export outputs/run/best --file texts.txt     # one text per line

Python:
    from infoprompt_ds.predict import Predictor
    Predictor.load("outputs/run/best").predict(["a gripping, funny film"])
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from infoprompt_ds.runtime.checkpoint import load_export
from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.data.load import encode
from infoprompt_ds.method.model import InfoPromptModel, load_backbone, load_model_config, load_tokenizer, model_inputs
from infoprompt_ds.data.readout import Readout


class Predictor:
    def __init__(self, model: InfoPromptModel, tokenizer, meta: dict, device: str, cfg: TrainConfig):
        self.model, self.tokenizer, self.meta, self.device, self.cfg = model.eval(), tokenizer, meta, device, cfg
        self.readout = model.readout  # the template/cue training applied: the same ids, the same predictions

    @classmethod
    def load(cls, export_dir: str, model_name_or_path: Optional[str] = None, device: Optional[str] = None):
        tensors, meta = load_export(export_dir)
        check_export(export_dir, tensors, meta)  # a hand-edited export: one line, before the backbone loads
        # Only what prediction needs: vanilla mode builds no estimator networks.
        cfg = TrainConfig(model_name_or_path=model_name_or_path or meta["backbone"],
                          method="probe" if meta["method"] == "probe" else "prompt",
                          n_virtual_tokens=max(1, meta["n_virtual_tokens"]), max_length=meta["max_length"],
                          k_shot=None, task_type=meta.get("task_type", "classification"),
                          entity_markers=meta.get("entity_markers", ["<e1>", "</e1>", "<e2>", "</e2>"]),
                          vib_head=bool(meta.get("vib_head", False)), estimator=meta.get("estimator", "normalized"),
                          bottleneck_dim=meta.get("bottleneck_dim") or 32, prompt_type=meta.get("prompt_type", "static"),
                          prompt_depth=meta.get("prompt_depth", "input"))
        # Exports written before read-outs existed used the linear head (no template).
        readout = Readout.from_meta(meta, pair=meta.get("text_pair_column") is not None)
        model_config = load_model_config(cfg)
        check_export(export_dir, tensors, meta, model_config.hidden_size, cfg.model_name_or_path)
        backbone = load_backbone(cfg.model_name_or_path, model_config, readout)
        model = InfoPromptModel(backbone, len(meta["labels"]), meta["pooling"], cfg, token_level=cfg.task_type == "ner",
                                readout=readout)
        wanted = {k: v for k, v in tensors.items() if k.startswith(("prompt.", "deep_prompt.", "generator.", "head.", "vib."))}
        if meta.get("z_stats"):  # the VIB classifier saw z standardised by the training run's statistics
            model.z_mean.copy_(torch.tensor(meta["z_stats"]["mean"]))
            model.z_std.copy_(torch.tensor(meta["z_stats"]["std"]))
        missing, unexpected = model.load_state_dict(wanted, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ConfigError("export", f"{export_dir} does not match its backbone: missing {missing}, "
                              f"unexpected {unexpected}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), load_tokenizer(cfg), meta, device, cfg)

    @torch.no_grad()
    def predict(self, texts: list[str], pairs: Optional[list[str]] = None, batch_size: int = 32) -> list:
        """A label per text; NER: a tag per whitespace-separated word; relation: texts carry the markers."""
        names, ner = self.meta["labels"], self.cfg.task_type == "ner"
        if self.readout.pair and (pairs is None or len(pairs) != len(texts)):
            raise ConfigError("text_pair", f"this export reads sentence pairs (template/cue of readout="
                              f"{self.readout.kind}); give one second text per text")
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = [t.split() for t in texts[i:i + batch_size]] if ner else texts[i:i + batch_size]
            enc = encode(self.tokenizer, self.cfg.task_type, self.cfg, chunk, pairs[i:i + batch_size] if pairs else None,
                         self.readout)
            word_ids = enc.pop("word_ids", None)
            batch = self.tokenizer.pad(dict(enc), return_tensors="pt").to(self.device)
            preds = self.model(**model_inputs(batch))["logits"].argmax(-1).tolist()
            if not ner:
                out += [names[j] for j in preds]
                continue
            for words, row, tokens in zip(word_ids, preds, chunk):
                tags, seen = ["O"] * len(tokens), set()  # words cut off by max_length stay O
                for pos, w in enumerate(words):
                    if w is not None and w not in seen:
                        seen.add(w)
                        tags[w] = names[row[pos]]
                out.append(tags)
        return out


REQUIRED_META = {"backbone": str, "labels": list, "n_virtual_tokens": int, "pooling": str, "max_length": int,
                 "method": str}


def check_export(export_dir, tensors: dict, meta: dict, hidden: Optional[int] = None,
                 backbone: Optional[str] = None) -> None:
    """The export's JSON and tensors agree with each other (and with the backbone's width, when given)."""
    where = f"{export_dir}/infoprompt_config.json"
    if not isinstance(meta, dict):
        raise ConfigError("export", f"{where} must hold a JSON object")
    for key, tp in REQUIRED_META.items():
        if key not in meta:
            raise ConfigError("export", f"{where} lacks {key!r}; re-export the run (it is written by training)")
        if not isinstance(meta[key], tp) or isinstance(meta[key], bool):
            raise ConfigError("export", f"{where}: {key} must be a {tp.__name__}, got {meta[key]!r}")
    labels = meta["labels"]
    if not labels or not all(isinstance(x, str) for x in labels):
        raise ConfigError("export", f"{where}: labels must be a non-empty list of names, got {labels!r}")
    head = tensors.get("head.weight")
    if head is None or head.dim() != 2:
        raise ConfigError("export", f"{export_dir} has no head.weight matrix")
    if head.shape[0] != len(labels):
        raise ConfigError("export", f"{where} lists {len(labels)} labels but head.weight has {head.shape[0]} rows")
    prompt = tensors.get("prompt.weight")
    if meta["method"] != "probe":
        if prompt is None or prompt.dim() != 2 or prompt.shape[0] != meta["n_virtual_tokens"]:
            raise ConfigError("export", f"{where} says n_virtual_tokens={meta['n_virtual_tokens']} but prompt.weight "
                              f"is {list(prompt.shape) if prompt is not None else 'missing'}")
    deep = tensors.get("deep_prompt.weight")
    if meta.get("prompt_depth", "input") == "deep" and (deep is None or deep.dim() != 3 or prompt is None
                                                        or deep.shape[1:] != prompt.shape):
        raise ConfigError("export", f"{where} says prompt_depth=deep but deep_prompt.weight is "
                          f"{list(deep.shape) if deep is not None else 'missing'} (needs [layers - 1, n, d])")
    if prompt is not None and prompt.dim() == 2 and prompt.shape[1] != head.shape[1]:  # the export against itself first
        raise ConfigError("export", f"{export_dir}: head.weight is {list(head.shape)} but prompt.weight is "
                          f"{list(prompt.shape)}: its tensors disagree (damaged or edited); export the run again")
    if hidden is not None and head.shape[1] != hidden:
        raise ConfigError("model_name_or_path", f"{backbone} is {hidden} wide, but the export was trained on a "
                          f"{head.shape[1]}-wide backbone ({meta['backbone']}); give that backbone")


def read_texts(path: str) -> list[str]:
    """One text per line of a file, or of stdin (`-` or /dev/stdin). Blank lines are kept (N lines in, N
    predictions out; a blank one gets label null)."""
    name = "stdin" if path in ("-", "/dev/stdin") else path
    if path == "-":
        raw = sys.stdin.buffer.read()
    else:
        p = Path(path)
        if not p.exists() or p.is_dir():
            raise ConfigError("file", f"not found: {path}")
        raw = p.read_bytes()  # also a pipe or /dev/stdin
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError("file", f"{name}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save it as UTF-8 (it may "
                          f"be latin-1)")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start another
    if not lines:
        raise ConfigError("file", f"{name} is empty; nothing to predict")
    if not any(line.strip() for line in lines):
        raise ConfigError("file", f"{name} holds only blank lines ({len(lines)}); nothing to predict")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Predict labels with an infoprompt export.")
    p.add_argument("--export", required=True, help="Export folder (output_dir/best or output_dir/export).")
    p.add_argument("--text", action="append", default=[], help="A text to label (repeatable).")
    p.add_argument("--text_pair", action="append", default=[], help=(
        "A sentence-pair export: the second text of each --text, in the same order (repeatable)."))
    p.add_argument("--file", help="A file with one text per line.")
    p.add_argument("--model_name_or_path", help="Backbone, if it moved since training (default: the export's).")
    args = p.parse_args(argv)
    texts = list(args.text)
    if args.file:
        texts += read_texts(args.file)
    if not texts:
        raise ConfigError("text", "give --text or --file")
    if args.text_pair and (args.file or len(args.text_pair) != len(texts)):
        raise ConfigError("text_pair", f"give one --text_pair per --text ({len(texts)}), and no --file")
    predictor = Predictor.load(args.export, args.model_name_or_path)
    keep = [i for i, t in enumerate(texts) if t.strip()]  # a blank line gets label null, in its place
    pairs = [args.text_pair[i] for i in keep] if args.text_pair else None
    labels = dict(zip(keep, predictor.predict([texts[i] for i in keep], pairs)))
    for i, text in enumerate(texts):
        print(json.dumps({"text": text, **({"text_pair": args.text_pair[i]} if pairs else {}),
                          "label": labels.get(i)}))
    sys.stdout.flush()


if __name__ == "__main__":
    from infoprompt_ds.errors import exit_on_config_error

    exit_on_config_error(main)
