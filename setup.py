from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
REQUIREMENTS = [line.strip() for line in (ROOT / "requirement.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
DOWNLOAD = ["img2dataset>=1.47,<2"]  # utils/download.py (CC3M / CC12M)

setup(
    name="rankclip",
    version="0.1.0",
    description="RankCLIP: ranking-consistent language-image pretraining (training and evaluation)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rankclip", "rankclip.*"]),
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={"download": DOWNLOAD, "test": ["pytest>=7", *DOWNLOAD]},
)
