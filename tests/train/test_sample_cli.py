"""`vlmgym-sample` end to end on the tiny preset model (a complete model directory)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from vlmgym_model.sample_cli import main

FAST = ["--num_generation_tokens", "6", "--dtype", "float32"]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "square.png"
    rgb = np.zeros((56, 56, 3), np.uint8)
    rgb[10:40, 12:30] = (200, 30, 30)
    Image.fromarray(rgb).save(path)
    return path


def test_samples_go_to_stdout_and_throughput_to_stderr(tiny_model_dir, image_path, capsys):
    argv = ["--model_dir", str(tiny_model_dir), "--image", str(image_path), "--prompt", "shape?"]
    assert main([*argv, *FAST, "--num_samples", "2", "--temperature", "1.0"]) == 0
    out, err = capsys.readouterr()
    assert out.count("--- sample ") == 2, out
    assert "tokens/s" in err and "tokens/s" not in out
    # greedy: the same completion twice, one block without a header
    assert main([*argv, *FAST, "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert main([*argv, *FAST, "--temperature", "0", "--seed", "7"]) == 0
    assert capsys.readouterr().out == first and "--- sample" not in first


def test_text_only_prompt_with_the_older_flag_spellings(tiny_model_dir, capsys):
    argv = ["--ckpt_dir", str(tiny_model_dir), "--prompt", "hello", "--max_new_tokens", "6"]
    assert main([*argv, "--dtype", "float32"]) == 0
    assert capsys.readouterr().err.count("tokens/s") == 1


def test_bad_inputs_fail_with_a_message(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rc = main(["--model_dir", str(tiny_model_dir), "--image", str(broken), "--prompt", "x"])
    assert rc == 2 and "cannot read image" in capsys.readouterr().err
    rc = main(["--model_dir", str(tmp_path / "missing"), "--prompt", "x"])
    assert rc == 2 and "vlmgym-sample: error" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither a prompt nor an image
        main(["--model_dir", str(tiny_model_dir)])
    assert "--prompt" in capsys.readouterr().err


def test_a_text_only_chat_template_reads_the_prompt_as_a_string(tiny_model_dir, tmp_path, capsys):
    """A text model's template concatenates `message['content']` as a string (HF users pass
    text as a string); a content list would end in a Jinja TypeError."""
    import json
    import shutil

    model = tmp_path / "text_template"
    shutil.copytree(tiny_model_dir, model)
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{% endfor %}<|im_start|>assistant\\n"
    )
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "chat_template.json").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert (
        main(["--model_dir", str(model), "--prompt", "hello", "--system", "be brief", *FAST]) == 0
    )
    assert "tokens/s" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag", ["--temperature=-1", "--temperature=nan", "--top_p=0", "--num_samples=0",
             "--max_pixels=0"],
)  # fmt: skip
def test_sampling_options_are_checked_before_loading(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stop:  # the model directory does not even exist
        main(["--model_dir", str(tmp_path / "none"), "--prompt", "x", flag])
    assert stop.value.code == 2 and flag.split("=")[0].lstrip("-") in capsys.readouterr().err
