"""RankCLIP: ranking-consistent language-image pretraining (training and evaluation)."""

__version__ = "0.1.0"
