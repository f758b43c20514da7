"""User errors end the programs with one line on stderr and exit code 2, before anything
is loaded or written; a traceback only with --debug."""

from __future__ import annotations

import errno

import pytest
from vlmgym_train.checkpointing import TrainCheckpointer
from vlmgym_train.cli import main as train_main
from vlmgym_train.eval_cli import main as eval_main

TINY = ["--groups_per_batch=2", "--group_size=2", "--num_generation_tokens=2",
        "--progress=false"]  # fmt: skip


def one_line_error(capsys, code: int | None, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and "error: " in last, err
    for needle in needles:
        assert needle in last, last
    return last


def exit_code(fn, argv) -> int | None:
    try:
        return fn(argv)
    except SystemExit as stop:  # argparse's own errors
        return stop.code


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--env_name=nope"], ["--env_name 'nope'", "no environment named", "shapes"]),
        (['--env_kwargs={"colour": 1}'], ["--env_kwargs", "colour"]),
        (['--env_name=osv5m', '--env_kwargs={"data_dir": "/nonexistent/osv"}'],
         ["/nonexistent/osv"]),
        (["--lr=inf"], ["--lr must be a finite number"]),
        (["--lr=nan"], ["--lr must be a finite number"]),
        (["--group_size=1"], ["trains nothing", "reinforce"]),
        (["--vlm_max_pixels=0"], ["--vlm_max_pixels must be >= 1"]),
        (["--temperature=-1"], ["--temperature must be >= 0"]),
        (["--kl_coef=inf"], ["--kl_coef"]),
    ],
)  # fmt: skip
def test_train_flags(tmp_path, capsys, flags, needles):
    run = tmp_path / "run"
    code = exit_code(train_main, [f"--save_dir={run}", *TINY, *flags])
    one_line_error(capsys, code, *needles)
    assert not run.exists(), "a failed start left a run directory behind"


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--temperature=-1"], ["--temperature must be >= 0"]),
        (["--max_eval_tasks=0"], ["--max_eval_tasks must be >= 1"]),
        (["--inference_batch_per_device=0"], ["--inference_batch_per_device must be >= 1"]),
        (["--dtype=foo"], ["--dtype"]),
        (["--env_name=nope"], ["no environment named"]),
        (["--max_pixels=0"], ["--vlm_max_pixels must be >= 1"]),
    ],
)
def test_eval_flags(tiny_model_dir, tmp_path, capsys, flags, needles):
    out = tmp_path / "out"
    code = exit_code(eval_main, [f"--model_dir={tiny_model_dir}", f"--output_dir={out}", *flags])
    one_line_error(capsys, code, *needles)
    assert not out.exists()


def test_eval_refuses_another_models_outputs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "records.jsonl").write_text('{"task": 0, "sample": 0}\n')
    code = eval_main([f"--model_dir={tiny_model_dir}", f"--output_dir={out}",
                      "--max_eval_tasks=2", "--num_generation_tokens=2"])  # fmt: skip
    one_line_error(capsys, code, "unknown settings", "--overwrite")
    assert (out / "records.jsonl").read_text() == '{"task": 0, "sample": 0}\n'


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    def full(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / str(step)))

    monkeypatch.setattr(TrainCheckpointer, "save", full)
    code = train_main([f"--save_dir={tmp_path}", *TINY, "--total_steps=1"])
    one_line_error(capsys, code, "the disk is full writing", "checkpoints/1")
    monkeypatch.undo()
    with pytest.raises(OSError, match="No space left"):  # --debug shows the traceback
        monkeypatch.setattr(TrainCheckpointer, "save", full)
        train_main([f"--save_dir={tmp_path / 'debug'}", *TINY, "--total_steps=1", "--debug"])
