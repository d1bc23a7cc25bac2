"""xpertctl: extract cross-domain experts from MoE LLMs and graft them into dense students (XPERT)."""

__version__ = "0.1.0"
