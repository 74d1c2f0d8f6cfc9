"""Property test over the command line's inputs: every case ends in exit 0 or one line + exit 2,
never a traceback, never a partial or stray file; a case with an input broken on purpose ends in exit 2."""

import contextlib
import io
import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jax_eplb import MoeLoadBalancerConfig, save_trtllm_dump
from jax_eplb.cli import main

_case_ids = itertools.count()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good and bad inputs of each kind, made once."""
    root = tmp_path_factory.mktemp("fuzz")
    counts = np.random.default_rng(0).integers(0, 50, size=(4, 3, 2, 8))  # [R, I, L, E]
    save_trtllm_dump(root / "dump", counts, layer_ids=[1, 2], iter_start=5, num_experts_per_token=2)
    save_trtllm_dump(root / "gap", counts, layer_ids=[1, 2], iter_start=5, num_experts_per_token=2)
    (root / "gap" / "rank2.safetensors").unlink()
    (root / "sglang.json").write_text(json.dumps({"logical_count": counts.sum(axis=(0, 1)).tolist()}))
    np.save(root / "counts.npy", counts.sum(axis=0))
    (root / "binary.json").write_bytes(bytes(range(256)) * 4)
    (root / "text.txt").write_text("not statistics\n")
    (root / "empty_dir").mkdir()
    (root / "plan.yaml").write_text("num_slots: 8\ninitial_global_assignments:\n"
                                    "  1: [0, 1, 2, 3, 4, 5, 6, 7]\n  2: [7, 6, 5, 4, 3, 2, 1, 0]\n")
    (root / "plan_unused.yaml").write_text("num_slots: 12\ninitial_global_assignments:\n"
                                           "  1: [0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 0, -1]\n"
                                           "  2: [0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 1, -1]\n")
    (root / "plan_dup.yaml").write_text("num_slots: 8\nnum_slots: 8\n")
    (root / "plan_bad.yaml").write_text("num_slots: [1\n")
    (root / "projection.yaml").write_text("ep_size: 2\nnum_slots: 8\n")
    (root / "binary.yaml").write_bytes(b"\x00\xff\xfe" * 50)
    return root


# Per input: values that are fine (None = flag left out) and values that must be refused or handled.
_COMMON = {
    "statistics": (["dump", "sglang.json", "counts.npy"], ["gap", "binary.json", "text.txt", "empty_dir", "missing"]),
    "ep_size": ([None, None, 1, 2, 4], [0, -2, 5]),  # 5 splits none of 8, 12, 16 slots
    "num_slots": ([None, None, 8, 12, 16], [0, -1, 4]),  # bad whatever the ranks (8 experts)
    "iter_start": ([None, None, 5, 6], [0, 9]),
}
_PLANS = (["plan.yaml", "plan_unused.yaml"],
          ["plan_dup.yaml", "plan_bad.yaml", "projection.yaml", "binary.yaml", "empty_dir", "missing.yaml"])
_INPUTS = {
    "report": {**_COMMON, "iter_stop": ([None, None, 7, 8], [5, 0]),
               "projection_eplb_config_path": ([None, None, *_PLANS[0], "projection.yaml"],
                                               [p for p in _PLANS[1] if p != "projection.yaml"]),
               "format": ([None, "json", "table"], []), "per_expert": ([False, True], []),
               "lower_bound": ([False, True], [])},
    "generate": {**_COMMON, "output": (["new", "exists", "nested/new"], ["empty_dir", "text.txt/below"]),
                 "algorithm": ([None, "balanced", "trtllm", "deepseek"], []),
                 "num_groups": ([None, 1, 2], [0, -1]), "num_nodes": ([None, 1, 2], [0]),
                 "previous_config": ([None, None, None, *_PLANS[0]], _PLANS[1]),
                 "failed_ranks": ([None, None, [1], [0, 1], [3]], [[-1], [1, 1]]),
                 "mask_only": ([False, False, True], []),
                 "layer_updates_per_iter": ([None, 0, 1], [-1]),
                 "migration_tolerance": ([None, 0.1], [-0.5])},
}


def _consistent(values: dict) -> dict:
    """Fine values that also fit together (each alone can still be refused in combination)."""
    if values["statistics"] != "dump":  # one recorded iteration window [0, I), no rank split
        values.update(iter_start=None, iter_stop=None, ep_size=values["ep_size"] or 2)
    if "lower_bound" in values and values["num_slots"] is not None:  # report: --num_slots is --lower_bound's
        values["lower_bound"] = True
    if values.get("iter_stop") is not None:
        values["iter_stop"] = (values["iter_start"] or 5) + 1 + values["iter_stop"] % 2
    if values.get("previous_config"):
        values["num_slots"] = 12 if "unused" in values["previous_config"] else 8
    if values.get("failed_ranks"):
        values.update(layer_updates_per_iter=0, ep_size=4, num_slots=values["num_slots"] or 16)
        values["num_slots"] = max(values["num_slots"], 12)
    if values.get("mask_only") and not (values.get("previous_config") and values.get("failed_ranks")):
        values["mask_only"] = False
    return values


_DUMP_ONLY = ("iter_start", "iter_stop")  # bad only against the dump's recorded iterations


@st.composite
def cases(draw, command):
    """``(values, spoiled)``: fine values everywhere, and in about half the cases one input made bad
    (``spoiled`` names it; None: none)."""
    inputs = _INPUTS[command]
    values = _consistent({name: draw(st.sampled_from(good)) for name, (good, _) in inputs.items()})
    spoilable = [name for name, (_, bad) in inputs.items()
                 if bad and (name not in _DUMP_ONLY or values["statistics"] == "dump")]
    spoiled = draw(st.sampled_from([None] * len(spoilable) + spoilable))
    if spoiled is not None:
        values[spoiled] = draw(st.sampled_from(inputs[spoiled][1]))
    return values, spoiled


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _argv(root, command, values):
    argv = [command, "--expert_statistic_path", str(root / values["statistics"])]
    for name, value in values.items():
        if name in ("statistics", "output") or value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{name}")
        elif name in ("projection_eplb_config_path", "previous_config"):
            argv += [f"--{name}", str(root / value)]
        else:
            argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def _check_outcome(code, err, root, spoiled):
    assert code in (0, 2), (code, err)
    assert spoiled is None or code == 2, f"the bad {spoiled} was accepted"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".partial"))], "stray temporary file"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases("report"))
def test_report_inputs(inputs, case):
    values, spoiled = case
    code, out, err = _run(_argv(inputs, "report", values))
    _check_outcome(code, err, inputs, spoiled)
    if code == 0:
        assert "average" in out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases("generate"))
def test_generate_inputs(inputs, case):
    values, spoiled = case
    target = inputs / values["output"]
    if values["output"] in ("new", "exists"):  # a fresh name per case
        target = target.with_name(f"plan_{next(_case_ids)}.yaml")
    if values["output"] == "exists":  # an earlier run's output: replaced on success, kept on failure
        target.write_text("earlier: output\n")
    existed = target.exists()
    before = target.read_text() if target.is_file() else None
    code, out, err = _run(_argv(inputs, "generate", values) + ["--output_path", str(target)])
    _check_outcome(code, err, inputs, spoiled)
    if code == 0:
        assert "wrote" in out
        MoeLoadBalancerConfig.from_yaml(target)  # a whole, strict-valid plan
    elif not existed:
        assert not target.exists(), "a failed run left its output"
    elif before is not None:
        assert target.read_text() == before, "a failed run changed the earlier output"


_EVERY_BAD = [(command, name, bad) for command, inputs in _INPUTS.items() for name, (_, bads) in inputs.items()
              for bad in bads]


@pytest.mark.parametrize("command,name,bad", _EVERY_BAD, ids=[f"{c}-{n}-{b}" for c, n, b in _EVERY_BAD])
def test_every_bad_value_alone_is_refused_in_one_line(inputs, command, name, bad):
    """Each bad value on its own, everything else fine (the dump, defaults): exit 2 and one line."""
    values = {"statistics": "dump", "output": "new"} if command == "generate" else {"statistics": "dump"}
    values[name] = bad
    argv = _argv(inputs, command, values)
    target = inputs / f"alone_{next(_case_ids)}.yaml"
    if command == "generate":
        argv += ["--output_path", str(inputs / values["output"]) if name == "output" else str(target)]
    code, _, err = _run(argv)
    _check_outcome(code, err, inputs, name)
    assert not target.exists()
