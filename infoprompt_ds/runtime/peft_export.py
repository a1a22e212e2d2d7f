"""The export's soft prompt as a PEFT prompt-tuning adapter, so the ecosystem can load it:

    from peft import PeftModel
    model = PeftModel.from_pretrained(backbone, "outputs/run/export")   # adapter_config.json + adapter_model.safetensors

What PEFT can represent is the static prompt prepended to the input embeddings (PROMPT_TUNING); the task
type says which model PEFT wraps, after the read-out the run used:

* lm_label (a decoder's label-word logits): CAUSAL_LM on AutoModelForCausalLM; the label-word logits
  are the LM head's rows of the label words at the last real token, as our read-out computes them.
* cloze (an encoder's [MASK] logits): FEATURE_EXTRACTION on AutoModelForMaskedLM. PEFT has no masked-LM
  task type; FEATURE_EXTRACTION is its plain "prompt + base model" wrapper, and the masked-LM base returns
  the vocabulary logits at [MASK].
* linear (a head on the pooled representation): FEATURE_EXTRACTION on AutoModel. SEQ_CLS would need the
  backbone's own classification head (BERT's pooler, ...), which is not our pooling; our head, pooling and
  labels stay in infoprompt.safetensors / infoprompt_config.json in the same folder.

Not representable, so no adapter is written (the reason is logged): instance-dependent prompts (PEFT's
prompt is one tensor for every input) and method=probe (no prompt). What PEFT ignores: a VIB classifier,
trained class rows and the MI estimator; they travel in infoprompt.safetensors (see docs/peft.md).
prompt_depth=deep: the adapter is the input-layer prompt only (a note is logged); the deeper layers' vectors
replace hidden states, which neither PEFT prompt tuning nor its prefix tuning (key/value prefixes) represents.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_KEY = "prompt.weight"  # our export's name for P (n x d)
DEEP_KEY = "deep_prompt.weight"  # prompt_depth=deep: layers 1..L-1's vectors ([L-1, n, d]); not PEFT-loadable
TASK_TYPES = {"lm_label": "CAUSAL_LM", "cloze": "FEATURE_EXTRACTION", "linear": "FEATURE_EXTRACTION"}


def peft_task_type(meta: dict[str, Any]) -> str:
    # Exports written before the read-out field existed used the linear head.
    return TASK_TYPES.get(meta.get("readout", "linear"), "FEATURE_EXTRACTION")


def skip_reason(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Optional[str]:
    if meta.get("prompt_type", "static") != "static":
        return f"prompt_type={meta['prompt_type']}: the prompt depends on the input, a PEFT prompt is one tensor"
    if PROMPT_KEY not in tensors:
        return "no soft prompt in this export (method=probe)"
    return None


def save_peft_adapter(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bool:
    """Write adapter_config.json + adapter_model.safetensors into `path` (the export folder being written).
    Returns False, with the reason on stderr, when PEFT cannot represent this export."""
    reason = skip_reason(tensors, meta)
    if reason is not None:
        print(f"[export] no PEFT adapter in {path.name}: {reason}", file=sys.stderr, flush=True)
        return False
    from peft import PromptTuningConfig

    prompt = tensors[PROMPT_KEY].detach().float().cpu().contiguous()
    if DEEP_KEY in tensors:  # PEFT's prefix tuning holds per-layer key/value prefixes, not hidden states
        print(f"[export] the PEFT adapter in {path.name} is the input-layer prompt only: PEFT cannot load the "
              f"deeper layers' vectors ({DEEP_KEY}, prompt_depth=deep); predict with infoprompt", file=sys.stderr,
              flush=True)
    # PEFT's own config class writes the json, so the file is exactly what PeftModel.from_pretrained reads;
    # num_layers/num_attention_heads are left for PEFT to fill from the backbone's config at load time.
    PromptTuningConfig(task_type=peft_task_type(meta), num_virtual_tokens=prompt.shape[0], token_dim=prompt.shape[1],
                       num_transformer_submodules=1, base_model_name_or_path=meta.get("backbone"),
                       inference_mode=True).save_pretrained(str(path))
    # The same fp32 values as infoprompt.safetensors, under the key PEFT saves prompt tuning with.
    save_file({"prompt_embeddings": prompt}, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return True
