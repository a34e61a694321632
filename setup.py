from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# One requirement a line; a comment (why this bound) may follow it after '#'.
REQUIREMENTS = [line.split("#")[0].strip() for line in (ROOT / "requirement.txt").read_text().splitlines()
                if line.split("#")[0].strip()]
# utils/download.py (CC3M / CC12M). img2dataset itself pins webdataset < 0.3 and pandas < 3, so
# installing this extra moves those two back; CI tests the code under both resolutions.
DOWNLOAD = ["img2dataset>=1.47"]

setup(
    name="rankclip",
    version="0.1.0",
    description="RankCLIP: ranking-consistent language-image pretraining (training and evaluation)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rankclip", "rankclip.*"]),
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={"download": DOWNLOAD, "test": ["pytest>=8"]},
)
