"""The flat stored format and the numbers of today's code, against the golden fixture in tests/golden/.

tests/golden/make_golden.py wrote the fixture on main 8d71e2a3, before issue 18 moved the configuration into
typed sections: the parser's flags, parse_config's flat dict for three argv cases, params.txt, and a
checkpoint that must still load, evaluate and resume to the same numbers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from golden.cases import (CHECKPOINT, GOLDEN, INTEGER_FIELDS, describe_parser, evaluate_checkpoint, normalise,
                          parsed_cases, resume_checkpoint, write_data)

STORED = json.loads((GOLDEN / "parser.json").read_text())
# Flags whose recorded facts changed on purpose since the fixture was written, with the issue that changed them.
# Every other recorded flag must be as recorded; flags added since are not in the fixture and are allowed.
CHANGED_FLAGS: dict[str, str] = {
    "loss": "#22",  # siglip
    "pretrained": "#22",  # a tag of open_clip's released weights, too
    "eval_data_type": "#21", "eval_test_data_dir": "#21", "retrieval_data": "#21",  # clip_benchmark folders
    "model_name": "#21",  # help: JSON paths, model folders, the checkpoint's model by default
    "num_workers": "#21",  # default: the CPUs this process may use, shared among the node's processes
    "resume_allow_changes": "#19",  # help: the AdamW settings are resume keys too
    "keep_checkpoints": "#19",  # default 3 (0 keeps every epoch)
}
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
FLAT_KEYS = set(STORED["parse_config"]["demo"])
CLOCK_FIELDS = ("samples_per_second", "samples_per_second_per_process")


def assert_records_match(actual: list[dict], expected: list[dict], rel: float) -> None:
    """Same records, keys and text; integers exact, floats within `rel` (clock-dependent rates skipped)."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert set(got) == set(want), (got.get("split"), set(got) ^ set(want))
        for key, value in want.items():
            if key in CLOCK_FIELDS:
                continue
            if isinstance(value, float) and key not in INTEGER_FIELDS:
                assert math.isclose(got[key], value, rel_tol=rel, abs_tol=1e-9), (got["split"], key, got[key], value)
            else:
                assert got[key] == value and type(got[key]) is type(value), (got["split"], key, got[key], value)


def by_dest(actions: list[dict]) -> dict[str, dict]:
    return {action["dest"]: action for action in actions}


def test_parser_actions_are_unchanged():
    """Every recorded flag keeps its spelling, type, choices, default and help (but those in CHANGED_FLAGS); --help
    lists them grouped by the configuration's sections now, so their order is not compared."""
    actions = by_dest(normalise(json.loads(json.dumps(describe_parser()))))
    for dest, recorded in by_dest(STORED["actions"]).items():
        assert dest in actions, f"--{dest} is gone"
        if dest not in CHANGED_FLAGS:
            assert actions[dest] == recorded, dest


def test_parse_config_flat_dicts_are_unchanged():
    """The recorded keys keep their values (but those in CHANGED_FLAGS); settings added since take their defaults."""
    for case, flat in json.loads(json.dumps(parsed_cases())).items():
        recorded = STORED["parse_config"][case]
        assert set(recorded) <= set(flat), (case, set(recorded) - set(flat))
        assert {k: v for k, v in flat.items() if k in recorded and k not in CHANGED_FLAGS} == \
            {k: v for k, v in recorded.items() if k not in CHANGED_FLAGS}, case


def test_stored_cases_cover_every_kind_of_value():
    """The fixture itself: lists, floats, bools and nulls, the --config file overridden by flags."""
    values = [v for case in STORED["parse_config"].values() for v in case.values()]
    assert {type(v) for v in values} >= {list, float, bool, type(None), int, str}
    from_file = json.loads((GOLDEN / "config_case.json").read_text())
    config_case = STORED["parse_config"]["config_file"]
    assert config_case["epochs"] == 3 != from_file["epochs"] and config_case["device_ids"] == from_file["device_ids"]


def test_checkpoint_loads_with_the_flat_config():
    obj = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert set(obj["config"]) == FLAT_KEYS
    assert obj["epoch"] == 1 and obj["config"]["train_data"] == "train.csv"


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    write_data(folder)
    return folder


@pytest.mark.e2e
def test_checkpoint_evaluates_to_the_recorded_numbers(data_folder):
    assert_records_match(evaluate_checkpoint(data_folder, CHECKPOINT), EXPECTED["evaluation"], rel=1e-5)


@pytest.fixture(scope="module")
def resumed(data_folder):
    return resume_checkpoint(data_folder, CHECKPOINT)


@pytest.mark.e2e
def test_params_txt_lists_the_flat_keys_and_values(resumed):
    """params.txt keeps every recorded line (but those of CHANGED_FLAGS); settings added since add lines."""
    def lines(text: str) -> dict[str, str]:
        return {line.split(":", 1)[0]: line for line in text.splitlines() if line.split(":", 1)[0] not in CHANGED_FLAGS}
    got, want = lines(resumed["params"]), lines(EXPECTED["params"])
    assert {key: got.get(key) for key in want} == want


@pytest.mark.e2e
def test_checkpoint_resumes_to_the_recorded_numbers(resumed):
    assert_records_match(resumed["records"], EXPECTED["records"], rel=1e-5)
    assert set(resumed["weights"]) == set(EXPECTED["weights"])
    for key, (total, squares) in EXPECTED["weights"].items():
        got_total, got_squares = resumed["weights"][key]
        assert math.isclose(got_total, total, rel_tol=1e-4, abs_tol=1e-6), (key, got_total, total)
        assert math.isclose(got_squares, squares, rel_tol=1e-4, abs_tol=1e-6), (key, got_squares, squares)
