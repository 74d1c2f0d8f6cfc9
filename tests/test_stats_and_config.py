"""Statistics formats, the strict YAML plan, assignment tables."""

import json

import numpy as np
import pytest
import yaml

from jax_eplb import (EplbInputError, MoeLoadBalancerConfig, build_assignment_tables,
                      default_slot_to_expert, load_statistics, load_trtllm_dump, plan_config_from_slots,
                      save_trtllm_dump)


def _rank_counts(seed=0, ranks=3, iters=4, layers=2, experts=6):
    return np.random.default_rng(seed).integers(0, 50, size=(ranks, iters, layers, experts))


def test_trtllm_dump_round_trip_sums_ranks(tmp_path):
    counts = _rank_counts()
    save_trtllm_dump(tmp_path, counts, layer_ids=[3, 5], iter_start=10, num_experts_per_token=2)
    # TensorRT-LLM's two keys, plus the ones its scripts derive (and overwrite) from the rank files
    assert json.loads((tmp_path / "meta_info.json").read_text()) == {
        "num_experts": 6, "num_experts_per_token": 2, "ep_size": 3, "iter_start": 10, "iter_stop": 14,
        "layers": [3, 5]}
    stats = load_trtllm_dump(tmp_path)
    assert not stats.partial
    assert stats.layer_ids == (3, 5) and stats.iter_start == 10 and stats.ep_size == 3
    np.testing.assert_array_equal(stats.counts, counts.sum(axis=0))
    window = stats.window(11, 13)
    np.testing.assert_array_equal(window.counts, counts.sum(axis=0)[1:3])


def test_trtllm_dump_file_layout_is_exact(tmp_path):
    from safetensors.numpy import load_file

    counts = _rank_counts(ranks=1, iters=1, layers=1)
    save_trtllm_dump(tmp_path, counts, layer_ids=[7], iter_start=3, num_experts_per_token=2)
    tensors = load_file(tmp_path / "rank0.safetensors")
    assert list(tensors) == ["3_7"] and tensors["3_7"].dtype == np.int64
    np.testing.assert_array_equal(tensors["3_7"], counts[0, 0, 0])


def test_trtllm_dump_bad_input(tmp_path):
    with pytest.raises(EplbInputError, match="does not exist"):
        load_statistics(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(EplbInputError, match="meta_info.json"):
        load_statistics(tmp_path / "empty")
    # non-contiguous iterations
    from safetensors.numpy import save_file

    bad = tmp_path / "gap"
    bad.mkdir()
    (bad / "meta_info.json").write_text('{"num_experts": 2, "num_experts_per_token": 1}')
    save_file({"1_3": np.array([1, 2]), "3_3": np.array([1, 2])}, bad / "rank0.safetensors")
    with pytest.raises(EplbInputError, match="contiguous"):
        load_statistics(bad)
    # truncated file
    save_trtllm_dump(tmp_path / "trunc", _rank_counts(), [0, 1], 0, 2)
    data = (tmp_path / "trunc" / "rank1.safetensors").read_bytes()
    (tmp_path / "trunc" / "rank1.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EplbInputError, match="rank1.safetensors"):
        load_statistics(tmp_path / "trunc")
    # missing layer in one iteration
    save_file({"0_3": np.array([1, 2]), "0_4": np.array([1, 2]), "1_3": np.array([1, 2])},
              bad / "rank0.safetensors")
    with pytest.raises(EplbInputError, match="layer 4"):
        load_statistics(bad)


def _resave(path, rank, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, path / f"rank{rank}.safetensors")


def test_trtllm_dump_is_checked_as_a_whole(tmp_path):
    counts = _rank_counts(ranks=3, iters=2, layers=2)
    dump = tmp_path / "dump"
    save_trtllm_dump(dump, counts, layer_ids=[3, 5], iter_start=0, num_experts_per_token=2)
    with pytest.raises(EplbInputError, match="--ep_size is 4"):
        load_statistics(dump, ep_size=4)
    assert load_statistics(dump, ep_size=3).ep_size == 3
    # a rank file gone: named as missing, not "cannot be split evenly"
    (dump / "rank1.safetensors").unlink()
    with pytest.raises(EplbInputError, match=r"rank1.safetensors.*missing.*incomplete"):
        load_statistics(dump)
    # the last rank file gone: only the metadata can tell
    _resave(dump, 1, {"0_3": counts[1, 0, 0], "0_5": counts[1, 0, 1], "1_3": counts[1, 1, 0],
                      "1_5": counts[1, 1, 1]})
    (dump / "rank2.safetensors").unlink()
    with pytest.raises(EplbInputError, match="ep_size=3.*hold 2"):
        load_statistics(dump)
    # rank files of different runs (another iteration window)
    _resave(dump, 2, {"5_3": counts[2, 0, 0], "5_5": counts[2, 0, 1]})
    with pytest.raises(EplbInputError, match="rank2.safetensors: holds other iterations"):
        load_statistics(dump)
    # metadata from another window
    meta = json.loads((dump / "meta_info.json").read_text())
    _resave(dump, 2, {"0_3": counts[2, 0, 0], "0_5": counts[2, 0, 1], "1_3": counts[2, 1, 0],
                      "1_5": counts[2, 1, 1]})
    (dump / "meta_info.json").write_text(json.dumps({**meta, "iter_stop": 7}))
    with pytest.raises(EplbInputError, match="iter_stop=7"):
        load_statistics(dump)
    # TensorRT-LLM's own dumps carry only the two keys: nothing else to check against
    (dump / "meta_info.json").write_text(json.dumps({"num_experts": 6, "num_experts_per_token": 2}))
    np.testing.assert_array_equal(load_statistics(dump).counts, counts.sum(axis=0))


def test_trtllm_dump_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    import safetensors.numpy

    counts = _rank_counts(ranks=4, iters=1, layers=1)
    real_save = safetensors.numpy.save_file
    written = []

    def failing_save(tensors, filename, *args, **kwargs):
        if len(written) == 2:
            raise OSError("disk full")
        written.append(filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_trtllm_dump(tmp_path / "dump", counts, [0], 0, 2)
    assert list(tmp_path.iterdir()) == []   # neither the dump nor its staging directory
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    save_trtllm_dump(tmp_path / "dump", counts, [0], 0, 2, partial=True)
    assert load_statistics(tmp_path / "dump").partial
    save_trtllm_dump(tmp_path / "dump", 2 * counts, [0], 0, 2)  # an earlier dump is replaced whole
    assert not load_statistics(tmp_path / "dump").partial and sorted(p.name for p in tmp_path.iterdir()) == ["dump"]
    np.testing.assert_array_equal(load_statistics(tmp_path / "dump").counts, 2 * counts.sum(0))
    (tmp_path / "dump" / "README").write_text("mine")
    with pytest.raises(EplbInputError, match="not a statistics dump"):
        save_trtllm_dump(tmp_path / "dump", counts, [0], 0, 2)


def test_written_files_honour_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_trtllm_dump(tmp_path / "dump", _rank_counts(ranks=1, iters=1, layers=1), [0], 0, 2)
        plan_config_from_slots(np.array([[0, 1, 2, 3, 4, 5]]), [0]).to_yaml(tmp_path / "plan.yaml")
    finally:
        os.umask(old)
    for path in [tmp_path / "dump", tmp_path / "dump" / "rank0.safetensors", tmp_path / "plan.yaml"]:
        assert path.stat().st_mode & 0o044 == 0o044, path   # group and others can read


def test_sglang_json_drops_dense_layers(tmp_path):
    rows = [[0.0] * 4, [0.0] * 4, [1.0, 2.0, 3.0, 4.0], [4.0, 0.0, 0.0, 1.0]]
    (tmp_path / "s.json").write_text(json.dumps({"logical_count": rows}))
    stats = load_statistics(tmp_path / "s.json")
    assert stats.layer_ids == (2, 3) and stats.num_iters == 1
    np.testing.assert_array_equal(stats.counts[0], np.array(rows[2:]))
    (tmp_path / "bad.json").write_text(json.dumps({"logical_count": [[1.0, -2.0]]}))
    with pytest.raises(EplbInputError, match="negative"):
        load_statistics(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text('{"logical_count": [[1.0, NaN]]}')
    with pytest.raises(EplbInputError, match="NaN"):
        load_statistics(tmp_path / "nan.json")


def test_numpy_formats(tmp_path):
    arr = np.arange(24, dtype=float).reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(load_statistics(tmp_path / "a.npy").counts, arr)
    np.savez(tmp_path / "b.npz", counts=arr[0], layer_ids=np.array([5, 6, 7]))
    stats = load_statistics(tmp_path / "b.npz")
    assert stats.layer_ids == (5, 6, 7) and stats.counts.shape == (1, 3, 4)
    np.save(tmp_path / "c.npy", np.zeros((2, 2, 2, 2)))
    with pytest.raises(EplbInputError, match="c.npy"):
        load_statistics(tmp_path / "c.npy")


def test_default_layout_matches_trtllm_rule():
    """Rank r holds experts r*E//R, r*E//R + 1, ... (mod E), worked out by hand."""
    assert default_slot_to_expert(num_experts=6, num_slots=8, ep_size=4).tolist() == [0, 1, 1, 2, 3, 4, 4, 5]
    assert default_slot_to_expert(num_experts=4, num_slots=8, ep_size=2).tolist() == [0, 1, 2, 3, 2, 3, 0, 1]
    assert default_slot_to_expert(num_experts=5, num_slots=6, ep_size=3).tolist() == [0, 1, 1, 2, 3, 4]
    assert default_slot_to_expert(num_experts=8, num_slots=8, ep_size=8).tolist() == list(range(8))


def test_assignment_tables_hand_worked():
    tables = build_assignment_tables(np.array([[2, 0, 2, 1, 0, 2]]), num_experts=3)
    assert tables.replica_count.tolist() == [[2, 1, 3]]
    assert tables.expert_slots.tolist() == [[[1, 4, -1], [3, -1, -1], [0, 2, 5]]]
    with pytest.raises(EplbInputError, match="expert 1 has no slot"):
        build_assignment_tables(np.array([[0, 0, 2]]), num_experts=3)


def test_config_yaml_round_trip_and_format(tmp_path):
    slots = np.array([[0, 1, 2, 0], [2, 1, 0, 1]])
    config = plan_config_from_slots(slots, layer_ids=[3, 4])
    path = tmp_path / "plan.yaml"
    config.to_yaml(path)
    text = path.read_text()
    assert "3: [0, 1, 2, 0]" in text  # inline lists as TensorRT-LLM writes them
    assert set(yaml.safe_load(text)) == {"initial_global_assignments", "layer_updates_per_iter", "num_slots"}
    loaded = MoeLoadBalancerConfig.from_yaml(path)
    np.testing.assert_array_equal(loaded.slot_to_expert([3, 4], 3, 2), slots)
    tables = loaded.assignment_tables([3, 4], 3, 2, max_replicas=3)
    assert tables.expert_slots.shape == (2, 3, 3)


@pytest.mark.parametrize("text,match", [
    ("num_slots: 4\nbogus: 1\n", "unknown key"),
    ("num_slots: four\n", "num_slots"),
    ("layer_updates_per_iter: -1\n", "layer_updates_per_iter"),
    ("initial_global_assignments:\n  3: [0, 1, 2, 0]\n", "layer\\(s\\) \\[4\\]"),
    ("initial_global_assignments:\n  3: [0, 1, 2, 0]\n  4: [0, 1, 1, 1]\n", "layer 4: expert\\(s\\) \\[2\\]"),
    ("initial_global_assignments:\n  3: [0, 1, 2, 0]\n  4: [0, 1, 9, 1]\n", "layer 4: slot 2 holds expert 9"),
    ("initial_global_assignments:\n  3: [0, 1, 2, 0]\n  4: [0, 1, 2]\n", "different slot counts"),
    ("num_slots: 5\n", "divisible"),
    ("num_slots: [1,\n", "malformed YAML"),
])
def test_config_rejects_bad_plans(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(EplbInputError, match=match) as info:
        MoeLoadBalancerConfig.from_yaml(path).slot_to_expert([3, 4], num_experts=3, ep_size=2)
    assert "bad.yaml" in str(info.value)
