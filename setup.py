from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# One requirement a line; a comment (why this bound) may follow it after '#'.
REQUIREMENTS = [line.split("#")[0].strip() for line in (ROOT / "requirement.txt").read_text().splitlines()
                if line.split("#")[0].strip()]
# utils/download.py (CC3M / CC12M). img2dataset itself pins webdataset < 0.3 and pandas < 3, so
# installing this extra moves those two back; CI tests the code under both resolutions.
DOWNLOAD = ["img2dataset>=1.47"]
# utils/bench_data.py and utils/bench_train.py compare against open_clip_train, which ships inside
# open_clip_torch; these are the imports it needs beyond requirement.txt. (open_clip_torch[training] would also bring them, but it
# pins webdataset<=0.2.86 and pulls in transformers, which open_clip_train's CLIP runs never use.)
# The tests run the benchmarks, so the test extra includes them.
BENCH = ["braceexpand>=0.1.7", "fsspec>=2023.1"]
# The tests read the clip_benchmark evaluation sets they write with clip_benchmark's own reader and write
# sets with its own converter (the project itself reads that layout without it).
COMPAT = ["clip-benchmark>=1.6"]

setup(
    name="rankclip",
    version="0.1.0",
    description="RankCLIP: ranking-consistent language-image pretraining (training and evaluation)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rankclip", "rankclip.*"]),
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={"download": DOWNLOAD, "bench": BENCH, "test": ["pytest>=8", *BENCH, *COMPAT]},
)
