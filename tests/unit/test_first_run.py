"""Issue 36 item 1: the first CPU run in a fresh environment compiles DeepSpeed's deepspeed_shm_comm op inside
deepspeed.init_distributed (about two minutes, no output of its own): one line says so before it starts."""

from pathlib import Path

from torch.utils.cpp_extension import _get_build_directory

from infoprompt_ds.runtime.process_group import announce_shm_op_build, shm_op_build_dir


def test_announces_the_op_build_only_when_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = shm_op_build_dir()
    capsys.readouterr()  # DeepSpeed's own "Setting accelerator to CPU" on its first use
    assert folder is not None and folder.name == "deepspeed_shm_comm"
    assert folder == Path(_get_build_directory(folder.name, verbose=False))  # where torch's JIT loader builds it
    announce_shm_op_build(rank=1)
    assert capsys.readouterr().out == ""  # rank 0 speaks for all
    announce_shm_op_build(rank=0)
    line = capsys.readouterr().out
    assert line.startswith("building DeepSpeed's deepspeed_shm_comm op once (~2 min") and str(tmp_path / "ext") in line
    (folder / "deepspeed_shm_comm.so").write_bytes(b"")  # built once: later runs say nothing
    assert shm_op_build_dir() is None
    announce_shm_op_build(rank=0)
    assert capsys.readouterr().out == ""
