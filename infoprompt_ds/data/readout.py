"""Read-outs: how a class score is read from the frozen backbone (docs/method.md, "Read-outs").

    linear    z = a pooled hidden state (pooling), logits = H z + b: a head the backbone never saw.
    cloze     encoders with a masked-LM head. The input is a template with the mask token
              (`{x} It was {mask}.`; pairs `{x1} ? {mask} , {x2}`), z = the MLM head's transform of the
              hidden state at the mask (the vector its vocabulary decoder reads), logits = H z + b with
              H, b starting from the decoder's rows and bias of the label words: step 0 is the zero-shot
              verbaliser.
    lm_label  decoder LLMs with a causal LM head. The input is `x cue` (pairs `x1 \\n x2 cue`), z = the last
              token's hidden state after the final norm (what the LM head reads), H starts from the LM
              head's rows of each label word's first token (leading-space form), b = 0: step 0 is the
              frozen LM's next-token logits restricted to the label words.
    auto      cloze when the checkpoint holds a masked-LM head (architectures *ForMaskedLM/*ForPreTraining),
              lm_label when it holds a causal LM head (*ForCausalLM/*LMHeadModel, or a decoder with tied
              embeddings), else linear; and linear for relation/NER and whenever no label words are known.

The soft prompt goes in front of the templated input (`P template(x)`); the unprompted pass reads the
same template without P. Templates are applied on token ids, so truncation cuts the texts and never the
template, the mask or the cue. Everything here takes its inputs as arguments (nothing reads a config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from infoprompt_ds.config import ConfigError

READOUTS = ("auto", "cloze", "lm_label", "linear")
TEMPLATE = "{x} It was {mask}."           # cloze, single texts (LM-BFF / PET style)
PAIR_TEMPLATE = "{x1} ? {mask} , {x2}"     # cloze, pairs (LM-BFF's RTE/MRPC template)
CUE = "\nAnswer:"                         # lm_label, when no cue is given and no label words are known
PAIR_JOIN = "\n"                          # lm_label, between the two texts of a pair
_PLACEHOLDER = re.compile(r"\{(x|x1|x2|mask)\}")


@dataclass(frozen=True)
class Readout:
    kind: str = "linear"             # cloze | lm_label | linear (auto is resolved before this exists)
    template: Optional[str] = None   # cloze: with {mask} and {x} (or {x1}, {x2})
    cue: Optional[str] = None        # lm_label: the text after the input
    pair: bool = False

    @property
    def templated(self) -> bool:
        return self.kind != "linear"

    @property
    def pooling(self) -> Optional[str]:
        """Where z is read: the mask token (cloze), the last real token (lm_label); None = cfg.pooling."""
        return {"cloze": "mask", "lm_label": "last"}.get(self.kind)

    def meta(self) -> dict[str, Any]:
        """What an export records (predict rebuilds the same read-out from it)."""
        return {"readout": self.kind, "template": self.template, "cue": self.cue}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], pair: bool) -> "Readout":
        return cls(meta.get("readout", "linear"), meta.get("template"), meta.get("cue"), pair)


LINEAR = Readout()


def lm_head_kind(model_config) -> Optional[str]:
    """'mlm' / 'causal' when the checkpoint's weights hold that head (its saved architectures say which
    class wrote them), else None. A sentence-transformers folder (BertModel) has neither."""
    archs = tuple(getattr(model_config, "architectures", None) or ())
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return "mlm"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    from infoprompt_ds.internals import masked_lm_model_types

    encoder = model_config.model_type in masked_lm_model_types() and not getattr(model_config, "is_decoder", False)
    if not encoder and getattr(model_config, "tie_word_embeddings", False):
        return "causal"  # the LM head is the input embedding matrix, which any decoder checkpoint holds
    return None


def resolve(requested: str, model_config, task_type: str, label_words: Optional[dict], pair: bool,
            template: Optional[str] = None, cue: Optional[str] = None, pooling: str = "auto",
            preset_template: Optional[str] = None, preset_cue: Optional[str] = None, name: str = "") -> Readout:
    """The read-out a run uses. `template`/`cue` are the user's (None = the preset's, else the default).
    A combination that cannot work is a ConfigError naming the field, before any weight loads."""
    head = lm_head_kind(model_config)
    if requested == "auto":
        kind = "linear"
        if task_type == "classification" and label_words:
            kind = {"mlm": "cloze", "causal": "lm_label"}.get(head, "linear")
    else:
        kind = requested
    if kind != "linear":
        if task_type != "classification":
            raise ConfigError("readout", f"readout={kind} reads one label word per input; task_type={task_type} "
                              f"uses readout=linear (NER labels every token; relations pool the entity markers)")
        if not label_words:
            raise ConfigError("label_words", f"readout={kind} starts each class row from its label word; give "
                              f"--label_words (e.g. pos=good,neg=bad) or use --readout linear")
        want = {"cloze": "mlm", "lm_label": "causal"}[kind]
        if head != want:
            archs = ", ".join(getattr(model_config, "architectures", None) or ["none saved"])
            what = "a masked-LM head (a *ForMaskedLM checkpoint)" if want == "mlm" else \
                "a causal LM head (a *ForCausalLM checkpoint)"
            raise ConfigError("readout", f"readout={kind} needs {what}; {name or model_config.model_type} has "
                              f"none (architectures: {archs}); use --readout linear or auto")
        if pooling != "auto":
            raise ConfigError("pooling", f"applies to readout=linear; readout={kind} reads z at the "
                              f"{'mask token' if kind == 'cloze' else 'last token'}: drop --pooling")
    for field_name, value, used_by in (("template", template, "cloze"), ("cue", cue, "lm_label")):
        if value is not None and kind != used_by:
            raise ConfigError(field_name, f"is used by readout={used_by}; this run's read-out is {kind}: drop "
                              f"--{field_name} or set --readout {used_by}")
    if kind == "cloze":
        t = template or preset_template or (PAIR_TEMPLATE if pair else TEMPLATE)
        check_template(t, pair)
        return Readout("cloze", template=t, pair=pair)
    if kind == "lm_label":
        return Readout("lm_label", cue=cue if cue is not None else preset_cue if preset_cue is not None else
                       label_cue(list(label_words.values())),
                       pair=pair)
    return LINEAR


def label_cue(words: list[str]) -> str:
    """The neutral cue for data without a preset (local files): it names the answers, so the frozen LM's
    next token is asked to be one of the label words ("\nAnswer (good or bad):"), not any word at all."""
    if not words:
        return CUE
    return f"\nAnswer ({', '.join(words[:-1])} or {words[-1]}):" if len(words) > 1 else f"\nAnswer ({words[0]}):"


def check_template(template: str, pair: bool) -> None:
    found = _PLACEHOLDER.findall(template)
    want = ["x1", "x2", "mask"] if pair else ["x", "mask"]
    if sorted(found) != sorted(want):
        raise ConfigError("template", f"{template!r} must hold {', '.join('{' + w + '}' for w in want)} once each "
                          f"({'sentence pairs' if pair else 'single texts'}); e.g. "
                          f"{PAIR_TEMPLATE if pair else TEMPLATE!r}")


# --- token ids ---------------------------------------------------------------------------------------------

def _pieces(ro: Readout) -> list[tuple[str, str]]:
    """The input as ('text', 'x'|'x1'|'x2'), ('lit', text) and ('mask', '') pieces, in order."""
    if ro.kind == "lm_label":
        body = [("text", "x1"), ("lit", PAIR_JOIN), ("text", "x2")] if ro.pair else [("text", "x")]
        return body + ([("lit", ro.cue)] if ro.cue else [])
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(ro.template):
        if m.start() > pos:
            out.append(("lit", ro.template[pos:m.start()]))
        out.append(("mask", "") if m.group(1) == "mask" else ("text", m.group(1)))
        pos = m.end()
    if pos < len(ro.template):
        out.append(("lit", ro.template[pos:]))
    # A space before a piece belongs to that piece, as when the whole string is tokenized at once: BPE
    # vocabularies mark a word's leading space ("Ġgood"), and mask tokens absorb the space before them.
    fixed: list[tuple[str, str]] = []
    space = False
    for kind, value in out:
        if kind == "lit":
            space = value.endswith(" ")
            if value.rstrip(" "):
                fixed.append(("lit", value.rstrip(" ")))
        else:
            fixed.append((kind, (" " if space and kind == "text" else "") + value))
            space = False
    return fixed


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text ([CLS] .. [SEP], <s> .. </s>)."""
    core = tokenizer("good", add_special_tokens=False)["input_ids"]
    full = tokenizer("good")["input_ids"]
    for i in range(len(full) - len(core) + 1):
        if full[i:i + len(core)] == core:
            return full[:i], full[i + len(core):]
    return [], []


def overhead(tokenizer, ro: Readout) -> int:
    """Tokens of the template, cue and specials: what max_length must leave room for besides the texts."""
    prefix, suffix = _specials(tokenizer)
    n = len(prefix) + (len(suffix) if ro.kind == "cloze" else 0)
    for kind, value in _pieces(ro):
        n += 1 if kind == "mask" else len(tokenizer(value, add_special_tokens=False)["input_ids"]) if kind == "lit" else 0
    return n


def check_tokenizer(ro: Readout, tokenizer, words: list[str], max_length: int) -> None:
    """Before any weight: a mask token for cloze, room for the texts, label words that differ in their
    first token (the class rows start from it: two equal ones could never be told apart at step 0)."""
    if not ro.templated:
        return
    if ro.kind == "cloze" and tokenizer.mask_token_id is None:
        raise ConfigError("readout", "readout=cloze needs a tokenizer with a mask token; use --readout linear")
    room = max_length - overhead(tokenizer, ro) - (2 if ro.pair else 1)
    if room < 0:
        raise ConfigError("max_length", f"{max_length} leaves no room for the text beside the "
                          f"{'template' if ro.kind == 'cloze' else 'cue'} ({overhead(tokenizer, ro)} tokens); raise it")
    firsts = [first_token(tokenizer, w) for w in words]
    if len(set(firsts)) < len(firsts):
        dup = [w for w, t in zip(words, firsts) if firsts.count(t) > 1]
        raise ConfigError("label_words", f"{dup} start with the same token, so their class rows would start "
                          f"equal under readout={ro.kind}; use words whose first tokens differ")


def first_token(tokenizer, word: str) -> int:
    from infoprompt_ds.data.tasks import word_ids

    return word_ids(tokenizer, word)[0]  # leading-space form (" good"), as the word follows the cue/mask


def encode(tokenizer, ro: Readout, texts: list[str], pairs: Optional[list[str]], max_length: int) -> dict:
    """Token ids of the templated inputs, at most max_length each: the texts are truncated (the longer of a
    pair first), never the template. cloze adds `mask_pos`, the mask token's position."""
    pieces = _pieces(ro)
    prefix, suffix = _specials(tokenizer)
    if ro.kind == "lm_label":
        suffix = []  # z is read at the last token: it must be the cue's, not an end-of-sequence token
    lits = {v: tokenizer(v, add_special_tokens=False)["input_ids"] for k, v in pieces if k == "lit"}
    fixed = len(prefix) + len(suffix) + sum(len(lits[v]) if k == "lit" else 1 for k, v in pieces if k != "text")
    columns = {"x": texts, "x1": texts, "x2": pairs}
    toks: dict[str, list[list[int]]] = {}
    for k, v in pieces:
        if k == "text":
            lead = " " if v.startswith(" ") else ""
            name = v.strip()
            rows = ["" if t is None else str(t) for t in columns[name]]
            toks[name] = [tokenizer(lead + t, add_special_tokens=False)["input_ids"] if t else [] for t in rows]
    out: dict[str, list] = {"input_ids": [], "attention_mask": []}
    if ro.kind == "cloze":
        out["mask_pos"] = []
    for i in range(len(texts)):
        parts = {name: rows[i] for name, rows in toks.items()}
        budget = max(0, max_length - fixed)
        if len(parts) == 2:  # longest first, as the tokenizer's own truncation does
            a, b = parts["x1"], parts["x2"]
            while len(a) + len(b) > budget:
                a, b = (a[:-1], b) if len(a) >= len(b) else (a, b[:-1])
            parts = {"x1": a, "x2": b}
        else:
            parts = {k: v[:budget] for k, v in parts.items()}
        ids = list(prefix)
        for k, v in pieces:
            if k == "mask":
                out.setdefault("mask_pos", []).append(len(ids))
                ids.append(tokenizer.mask_token_id)
            else:
                ids += lits[v] if k == "lit" else parts[v.strip()]
        ids += suffix
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
    if "token_type_ids" in tokenizer.model_input_names:
        out["token_type_ids"] = [[0] * len(ids) for ids in out["input_ids"]]
    return out


# --- the backbone side ---------------------------------------------------------------------------------------

def auto_class(kind: str):
    """The transformers class that loads the weights a read-out needs (the head rows/transform too)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    return {"cloze": AutoModelForMaskedLM, "lm_label": AutoModelForCausalLM}.get(kind, AutoModel)


def mlm_head_name(backbone) -> str:
    """The module that holds the MLM decoder (BERT: cls.predictions; RoBERTa: lm_head): calling it on a
    hidden state runs the transform and then the decoder. Families whose transform sits on the top model
    itself (DistilBERT, ELECTRA's generator) have no such module."""
    decoder = backbone.get_output_embeddings()
    for name, module in backbone.named_modules():
        if module is not backbone and any(child is decoder for child in module.children()):
            return name
    raise ConfigError("readout", f"readout=cloze: the masked-LM head of {backbone.config.model_type} is not a "
                      f"separate module (its transform is unknown here); use --readout linear")


def mlm_transform(backbone, head_name: str, h: torch.Tensor) -> torch.Tensor:
    """The MLM head's transform of h (B, d): the input its vocabulary decoder sees. The head runs whole
    (a frozen backbone module, so ZeRO-3 gathers it as usual); a hook keeps the decoder's input."""
    decoder = backbone.get_output_embeddings()
    seen: list[torch.Tensor] = []
    handle = decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        backbone.get_submodule(head_name)(h.unsqueeze(1))
    finally:
        handle.remove()
    return seen[0].squeeze(1)


def class_rows(backbone, kind: str, token_ids: list[int]) -> tuple[list[torch.Tensor], Any]:
    """(parameters to gather, fn) where fn() returns (rows C x d, bias C) from the gathered values: the LM
    head's (lm_label; bias 0) or the MLM decoder's (cloze) rows of the label words' first tokens."""
    out_emb = backbone.get_output_embeddings()
    weight = out_emb.weight if out_emb is not None else backbone.get_input_embeddings().weight
    bias = getattr(out_emb, "bias", None) if kind == "cloze" else None
    params = [weight] + ([bias] if bias is not None else [])
    ids = torch.tensor(token_ids, dtype=torch.long)

    def read():
        rows = weight.detach().float()[ids].clone()
        b = bias.detach().float()[ids].clone() if bias is not None else torch.zeros(len(ids))
        return rows, b

    return params, read
