"""Node display names and the one error path of the pack: a ``GRNNodeError`` whose message starts with the node's
name and says what to change (ComfyUI shows it on the node)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from grn_core.runtime.memory import GRNOutOfMemoryError

# Display names: the prefix of every error message, so the user knows which node to fix.
LOAD = "Load GRN"
ENCODE_PROMPT = "GRN Encode Prompt"
SAMPLER = "GRN Refine Sampler"
DECODE = "GRN Decode Video"
ENCODE_IMAGE = "GRN Encode Image"
STATS = "GRN Refine Stats"


class GRNNodeError(ValueError):
    """A problem the user can fix; the message names the node and the fix."""


def node_error(node: str, error: BaseException | str) -> GRNNodeError:
    text = str(error)
    return GRNNodeError(text if text.startswith(node) else f"{node}: {text}")


@contextlib.contextmanager
def errors_from(node: str) -> Iterator[None]:
    """Re-raise library ValueErrors / missing files as ``GRNNodeError`` naming ``node``; out-of-memory errors stay
    ``GRNOutOfMemoryError`` (with their advice) and get the node's name in front as well."""
    try:
        yield
    except GRNNodeError:
        raise
    except GRNOutOfMemoryError as error:
        text = str(error)
        if text.startswith(node):
            raise
        raise GRNOutOfMemoryError(f"{node}: {text}", error.stage, error.advice) from error
    except (ValueError, FileNotFoundError) as error:
        raise node_error(node, error) from error
