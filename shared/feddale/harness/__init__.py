"""The evaluation harness: in-process federation (simulate), benchmark suite and demo."""
