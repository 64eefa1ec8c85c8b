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


def one_of(variants: set[str], options: tuple[str, ...], default: str, config: str,
           what: str) -> str:
  """The one of `options` named among `variants` (`default` if none); two are an error."""
  chosen = sorted(variants & set(options))
  if len(chosen) > 1:
    raise ValueError(f"{config}: choose one {what} of {', '.join(options)}; "
                     f"got {', '.join(chosen)}.")
  return chosen[0] if chosen else default
