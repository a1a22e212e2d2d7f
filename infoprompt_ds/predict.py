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

from .checkpoint import load_export
from .config import ConfigError, TrainConfig
from .model import InfoPromptModel, load_model_config, load_tokenizer, resolve_model_path


class Predictor:
    def __init__(self, model: InfoPromptModel, tokenizer, meta: dict, device: str):
        self.model, self.tokenizer, self.meta, self.device = model.eval(), tokenizer, meta, device

    @classmethod
    def load(cls, export_dir: str, model_name_or_path: Optional[str] = None, device: Optional[str] = None):
        tensors, meta = load_export(export_dir)
        # Only what prediction needs: vanilla mode builds no estimator networks.
        cfg = TrainConfig(model_name_or_path=model_name_or_path or meta["backbone"],
                          method="probe" if meta["method"] == "probe" else "prompt",
                          n_virtual_tokens=max(1, meta["n_virtual_tokens"]), max_length=meta["max_length"],
                          pooling=meta["pooling"], k_shot=None)
        from transformers import AutoModel

        model_config = load_model_config(cfg)
        backbone = AutoModel.from_pretrained(resolve_model_path(cfg.model_name_or_path), config=model_config)
        model = InfoPromptModel(backbone, len(meta["labels"]), meta["pooling"], cfg)
        wanted = {k: v for k, v in tensors.items() if k.startswith(("prompt.", "head."))}
        missing, unexpected = model.load_state_dict(wanted, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ConfigError("export", f"{export_dir} does not match its backbone: missing {missing}, "
                              f"unexpected {unexpected}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), load_tokenizer(cfg), meta, device)

    @torch.no_grad()
    def predict(self, texts: list[str], pairs: Optional[list[str]] = None, batch_size: int = 32) -> list[str]:
        labels = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None,
                                 truncation=True, max_length=self.meta["max_length"], padding=True,
                                 return_tensors="pt").to(self.device)
            keys = ("input_ids", "attention_mask", "token_type_ids")
            logits = self.model(**{k: enc[k] for k in keys if k in enc})["logits"]
            labels += [self.meta["labels"][j] for j in logits.argmax(-1).tolist()]
        return labels


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Predict labels with an infoprompt export.")
    p.add_argument("--export", required=True, help="Export folder (output_dir/best or output_dir/export).")
    p.add_argument("--text", action="append", default=[], help="A text to label (repeatable).")
    p.add_argument("--file", help="A file with one text per line.")
    p.add_argument("--model_name_or_path", help="Backbone, if it moved since training (default: the export's).")
    args = p.parse_args(argv)
    texts = list(args.text)
    if args.file:
        if not Path(args.file).is_file():
            raise ConfigError("file", f"not found: {args.file}")
        texts += [line.rstrip("\n") for line in open(args.file, encoding="utf-8") if line.strip()]
    if not texts:
        raise ConfigError("text", "give --text or --file")
    predictor = Predictor.load(args.export, args.model_name_or_path)
    for text, label in zip(texts, predictor.predict(texts)):
        print(json.dumps({"text": text, "label": label}))
    sys.stdout.flush()


if __name__ == "__main__":
    from .cli import predict_main

    predict_main()
