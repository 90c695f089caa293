"""minidpo: Direct Preference Optimization (arXiv 2305.18290) from scratch, beside RLHF.

A tiny GPT learns a toy world, is fine-tuned on demonstrations (SFT), then is
aligned on the same preference pairs two ways: with the DPO loss, and with the
RLHF pipeline DPO replaces (a Bradley-Terry reward model, then PPO). An oracle
reward, a plain function of the text, measures every policy the same way.

Start with `minidpo --help`, the README, and the lessons/ notebooks.
"""

__version__ = "0.1.0"
