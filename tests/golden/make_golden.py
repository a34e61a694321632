"""Write the golden fixture of tests/test_golden.py: parser.json, epoch_1.pt and expected.json.

It was run on main at 8d71e2a3 (before issue 18 moved the configuration into typed sections), so the
files record TODAY's flat stored format and numbers; re-running it on later code would hide a change.
Re-run only to deliberately accept a new format, from the repository root:

    OMP_NUM_THREADS=1 /work/venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tests.golden.cases import (CHECKPOINT, GOLDEN, TRAIN_FLAGS, evaluate_checkpoint, parser_record,  # noqa: E402
                                resume_checkpoint, run_cli, write_data)


def main() -> None:
    (GOLDEN / "parser.json").write_text(json.dumps(parser_record(), indent=1) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_data(folder)
        run_cli(folder, [*TRAIN_FLAGS, "--name", "trained"])
        shutil.copyfile(folder / "logs" / "trained" / "checkpoints" / "epoch_1.pt", CHECKPOINT)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_data(folder)
        expected = {"evaluation": evaluate_checkpoint(folder, CHECKPOINT), **resume_checkpoint(folder, CHECKPOINT)}
    (GOLDEN / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
