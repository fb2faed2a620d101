"""A progress bar: tqdm when it is installed, else one plain line per item on stderr."""
from __future__ import annotations

import sys


class _Lines:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0

    def describe(self, text: str) -> None:
        print(f"[{self.n + 1}/{self.total}] {self.desc} {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        print(f"{self.desc}: {self.n}/{self.total} done", file=sys.stderr, flush=True)


class _Tqdm:
    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def describe(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, text: str) -> None:
        self._tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str):
    """An object with describe(text), update(n), write(text) and close()."""
    try:
        return _Tqdm(total, desc)
    except ImportError:
        print("(tqdm is not installed: plain progress lines instead of a bar)", file=sys.stderr)
        return _Lines(total, desc)
