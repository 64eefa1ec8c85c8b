"""Name -> factory registries, so configs choose ops, datasets and objectives by string."""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterable, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config that cannot run; its message is the one line a user sees."""


class Registry(Generic[T]):
  """A named mapping whose lookup errors list the valid choices.

  Errors name the config key that asked for the item, so a user sees one line
  saying what was wrong and what would have been right.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._items: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(item: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._items[name] = item
      return item
    return decorator

  def add(self, name: str, item: T) -> None:
    self.register(name)(item)

  def get(self, name: str, key: str | None = None) -> T:
    if name not in self._items:
      where = f" (config key {key})" if key else ""
      raise ConfigError(
          f"Unknown {self.kind} {name!r}{where}; valid choices: "
          f"{', '.join(sorted(self._items))}.")
    return self._items[name]

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: Any) -> bool:
    return name in self._items

  def check_all(self, names: Iterable[str], key: str | None = None) -> None:
    for name in names:
      self.get(name, key)
