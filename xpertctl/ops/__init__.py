"""Operations: plain functions on tensors and small dataclasses. They never import the CLI."""
