"""Resume checks see every file of a data mixture and of an `hf:path:config:split` spec."""

from align_jax.train.status import data_changes, data_identity


def test_mixture_and_hf_config_identity(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "ds"
    a.write_text('{"text": "x"}\n')
    (b / "chat").mkdir(parents=True)
    (b / "chat" / "train.jsonl").write_text('{"text": "y"}\n')
    hf = f"hf:{b}:chat:train"
    assert set(data_identity(hf)["files"]) == {"chat/train.jsonl"}
    before = data_identity([(str(a), 0.5), (hf, 0.5)])
    assert set(before["files"]) == {str(a), str(b / "chat" / "train.jsonl")}
    assert data_identity(f"{a}@1,{hf}@1") == before
    (b / "chat" / "train.jsonl").write_text('{"text": "z"}\n')
    after = data_identity([(str(a), 0.5), (hf, 0.5)])
    assert data_changes(before, after) == f"{b / 'chat' / 'train.jsonl'} (content differs)"
    assert data_identity([("hf:org/name", 1.0), ("hf:other:cfg", 2.0)]) is None
