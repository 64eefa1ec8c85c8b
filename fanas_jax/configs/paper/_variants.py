"""Parsing of a paper config's variant argument, e.g. 'searched,tiny'."""
from __future__ import annotations


def parse(arg: str | None, choices: tuple[str, ...], config: str) -> set[str]:
  """The comma-separated variant names in `arg`, each one of `choices`."""
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(names - set(choices))
  if unknown:
    raise ValueError(f"Unknown {config} variant {unknown[0]!r}; valid choices: "
                     f"{', '.join(choices)} (several joined by ',').")
  return names
