"""`predict` on a hand-edited export, the wrong backbone, a latin-1 file, stdin and blank lines (issue 15):
one-line errors (exit 2) instead of tracebacks; N lines in, N predictions out. The export is a real
save_export of prompt + head tensors for the tiny BERT; the input cases run the real `infoprompt_ds.predict`
process (stdin needs one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from reliability_lib import record_case, stderr_lines

pytestmark = pytest.mark.reliability


@pytest.fixture(autouse=True)
def _count(request):
    yield
    record_case(request, "predict_errors")


def _export(path: Path, tiny_bert: str, **meta_over) -> Path:
    from infoprompt_ds.runtime.checkpoint import save_export

    torch.manual_seed(0)
    tensors = {"prompt.weight": torch.randn(4, 32), "head.weight": torch.randn(2, 32), "head.bias": torch.zeros(2)}
    meta = {"backbone": tiny_bert, "labels": ["neg", "pos"], "n_virtual_tokens": 4, "pooling": "cls",
            "max_length": 24, "method": "prompt", "task_type": "classification", **meta_over}
    save_export(path, tensors, {k: v for k, v in meta.items() if v is not None})
    return path


def _predict(args: list[str], stdin: str | bytes | None = None) -> subprocess.CompletedProcess:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run([sys.executable, "-m", "infoprompt_ds.predict", *args], cwd=ROOT, input=data,
                          capture_output=True, timeout=300)


def _refused_in_process(args: list[str], field: str, needle: str) -> None:
    import contextlib
    import io

    from infoprompt_ds.cli import predict_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
        predict_main(args)
    lines = stderr_lines(err.getvalue())
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}: "), lines
    assert needle in lines[0], lines


@pytest.mark.parametrize("edit,needle", [({"labels": None}, "lacks 'labels'"),
                                         ({"n_virtual_tokens": 8}, "n_virtual_tokens=8"),
                                         ({"labels": ["a", "b", "c"]}, "lists 3 labels"),
                                         ({"max_length": "24"}, "max_length must be a int")])
def test_hand_edited_export(edit, needle, tiny_bert, tmp_path):
    export = _export(tmp_path / "export", tiny_bert, **edit)
    _refused_in_process(["--export", str(export), "--text", "good film"], "export", needle)


def test_backbone_of_another_width(tiny_bert, tmp_path):
    from transformers import BertConfig, BertModel

    wide = tmp_path / "wide"
    BertModel(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(wide)
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_bert) / f).exists():
            (wide / f).write_bytes((Path(tiny_bert) / f).read_bytes())
    export = _export(tmp_path / "export", tiny_bert)
    _refused_in_process(["--export", str(export), "--text", "good", "--model_name_or_path", str(wide)],
                        "model_name_or_path", "64 wide")


def test_latin1_file(tiny_bert, tmp_path):
    export = _export(tmp_path / "export", tiny_bert)
    (tmp_path / "in.txt").write_bytes("good film\ncafé bad\n".encode("latin-1"))
    _refused_in_process(["--export", str(export), "--file", str(tmp_path / "in.txt")], "file", "in.txt:2: not UTF-8")


def test_all_blank_file(tiny_bert, tmp_path):
    export = _export(tmp_path / "export", tiny_bert)
    (tmp_path / "in.txt").write_text("\n  \n\n")
    _refused_in_process(["--export", str(export), "--file", str(tmp_path / "in.txt")], "file", "only blank lines (3)")


@pytest.mark.parametrize("how", ["-", "/dev/stdin"])
def test_stdin_and_blank_lines_kept(how, tiny_bert, tmp_path):
    export = _export(tmp_path / "export", tiny_bert)
    r = _predict(["--export", str(export), "--file", how], stdin="good film\n\nbad plot\n \nnice\n")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [row["text"] for row in rows] == ["good film", "", "bad plot", " ", "nice"]
    assert [row["label"] is None for row in rows] == [False, True, False, True, False]
    assert all(row["label"] in ("neg", "pos") for row in rows if row["text"].strip())


# --- issue 34 item 6 ----------------------------------------------------------------------------------

def test_an_all_nan_adapter_is_refused(tiny_bert, tmp_path):
    from safetensors.torch import load_file, save_file

    export = _export(tmp_path / "export", tiny_bert)
    tensors = load_file(str(export / "infoprompt.safetensors"))
    tensors["prompt.weight"] = torch.full_like(tensors["prompt.weight"], float("nan"))  # predicted silently
    save_file(tensors, str(export / "infoprompt.safetensors"))
    _refused_in_process(["--export", str(export), "--text", "good film"], "export",
                        "prompt.weight holds 128 NaN/inf value(s) of 128")


def test_a_tampered_head_is_not_blamed_on_the_backbone(tiny_bert, tmp_path):
    from safetensors.torch import load_file, save_file

    export = _export(tmp_path / "export", tiny_bert)
    tensors = load_file(str(export / "infoprompt.safetensors"))
    tensors["head.weight"] = tensors["head.weight"][:, :31].contiguous()  # was "backbone is 32 wide, export 31"
    save_file(tensors, str(export / "infoprompt.safetensors"))
    _refused_in_process(["--export", str(export), "--text", "good film"], "export",
                        "head.weight is [2, 31] but prompt.weight is [4, 32]: its tensors disagree")
